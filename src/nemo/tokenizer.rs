//! The SentencePiece `tokenizer.model` artifact: a protobuf `ModelProto`, read with a small
//! bounds-checked protobuf decoder (no generated code, no C++).

use crate::error::{Error, Result};

/// Kind of a vocabulary piece (`SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> PieceType {
        match v {
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => PieceType::Normal,
        }
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

impl Piece {
    pub fn new(piece: &str, score: f32, kind: PieceType) -> Piece {
        Piece {
            piece: piece.to_string(),
            score,
            kind,
        }
    }

    /// Llama's first three pieces: `<unk>`, `<s>`, `</s>`.
    pub fn llama_specials() -> Vec<Piece> {
        vec![
            Piece::new("<unk>", 0.0, PieceType::Unknown),
            Piece::new("<s>", 0.0, PieceType::Control),
            Piece::new("</s>", 0.0, PieceType::Control),
        ]
    }
}

/// The parts of a SentencePiece model that conversion and the runtime use.
#[derive(Debug, Clone)]
pub struct SpModel {
    pub pieces: Vec<Piece>,
    /// 1 unigram, 2 BPE, 3 word, 4 char.
    pub model_type: u64,
    pub byte_fallback: bool,
    pub unk_id: i64,
    pub bos_id: i64,
    pub eos_id: i64,
    pub pad_id: i64,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
    pub normalizer_name: String,
    pub split_digits: bool,
}

impl SpModel {
    /// Parses a serialized `ModelProto`; `file` names it in errors.
    pub fn parse(data: &[u8], file: &str) -> Result<SpModel> {
        let err = |msg: String| Error::Tokenizer {
            file: file.to_string(),
            msg,
        };
        let mut m = SpModel {
            pieces: Vec::new(),
            model_type: 1,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
            normalizer_name: String::new(),
            split_digits: false,
        };
        let not_sp = |e: String| err(format!("not a SentencePiece model ({e})"));
        for field in Fields::new(data) {
            let (num, val) = field.map_err(not_sp)?;
            match (num, val) {
                (1, Val::Bytes(b)) => m.pieces.push(parse_piece(b).map_err(not_sp)?),
                (2, Val::Bytes(b)) => {
                    for f in Fields::new(b) {
                        match f.map_err(not_sp)? {
                            (3, Val::Varint(v)) => m.model_type = v,
                            (25, Val::Varint(v)) => m.split_digits = v != 0,
                            (35, Val::Varint(v)) => m.byte_fallback = v != 0,
                            (40, Val::Varint(v)) => m.unk_id = v as i32 as i64,
                            (41, Val::Varint(v)) => m.bos_id = v as i32 as i64,
                            (42, Val::Varint(v)) => m.eos_id = v as i32 as i64,
                            (43, Val::Varint(v)) => m.pad_id = v as i32 as i64,
                            _ => {}
                        }
                    }
                }
                (3, Val::Bytes(b)) => {
                    for f in Fields::new(b) {
                        match f.map_err(not_sp)? {
                            (1, Val::Bytes(n)) => {
                                m.normalizer_name = String::from_utf8_lossy(n).into_owned()
                            }
                            (3, Val::Varint(v)) => m.add_dummy_prefix = v != 0,
                            (4, Val::Varint(v)) => m.remove_extra_whitespaces = v != 0,
                            (5, Val::Varint(v)) => m.escape_whitespaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            return Err(err(
                "not a SentencePiece model (no vocabulary pieces)".into()
            ));
        }
        for (what, id) in [("unk", m.unk_id), ("bos", m.bos_id), ("eos", m.eos_id)] {
            if id >= m.pieces.len() as i64 {
                return Err(err(format!(
                    "{what}_id {id} is outside the {} pieces",
                    m.pieces.len()
                )));
            }
        }
        Ok(m)
    }

    /// Number of pieces: the real vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The id of a piece spelled exactly `s`.
    pub fn piece_id(&self, s: &str) -> Option<usize> {
        self.pieces.iter().position(|p| p.piece == s)
    }

    /// The text of piece `id`, when it exists.
    pub fn piece(&self, id: i64) -> Option<&str> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.pieces.get(i))
            .map(|p| p.piece.as_str())
    }

    /// `<extra_id_N>` markers that are single pieces, with their ids, in N order.
    pub fn extra_id_pieces(&self) -> Vec<(String, usize)> {
        let mut found: Vec<(u64, String, usize)> = self
            .pieces
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let n = p
                    .piece
                    .strip_prefix("<extra_id_")?
                    .strip_suffix('>')?
                    .parse()
                    .ok()?;
                Some((n, p.piece.clone(), i))
            })
            .collect();
        found.sort();
        found.into_iter().map(|(_, s, i)| (s, i)).collect()
    }

    /// Human name of the model type.
    pub fn model_type_name(&self) -> &'static str {
        match self.model_type {
            1 => "unigram",
            2 => "bpe",
            3 => "word",
            4 => "char",
            _ => "unknown",
        }
    }
}

fn parse_piece(b: &[u8]) -> std::result::Result<Piece, String> {
    let mut p = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    for f in Fields::new(b) {
        match f? {
            (1, Val::Bytes(s)) => {
                p.piece =
                    String::from_utf8(s.to_vec()).map_err(|_| "a piece is not UTF-8".to_string())?
            }
            (2, Val::Fixed32(v)) => p.score = f32::from_bits(v),
            (3, Val::Varint(v)) => p.kind = PieceType::from_proto(v),
            _ => {}
        }
    }
    Ok(p)
}

enum Val<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Iterates the fields of one protobuf message.
struct Fields<'a> {
    data: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(data: &'a [u8]) -> Self {
        Fields {
            data,
            pos: 0,
            failed: false,
        }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.data.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn bytes(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("field runs past the end")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn next_field(&mut self) -> std::result::Result<(u64, Val<'a>), String> {
        let key = self.varint()?;
        let num = key >> 3;
        let val = match key & 7 {
            0 => Val::Varint(self.varint()?),
            1 => {
                self.bytes(8)?;
                Val::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length overflows")?;
                Val::Bytes(self.bytes(n)?)
            }
            5 => Val::Fixed32(u32::from_le_bytes(
                self.bytes(4)?.try_into().expect("4 bytes"),
            )),
            w => return Err(format!("unsupported wire type {w}")),
        };
        if num == 0 {
            return Err("field number 0".into());
        }
        Ok((num, val))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = std::result::Result<(u64, Val<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.data.len() {
            return None;
        }
        let r = self.next_field();
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

/// Serialises a minimal SentencePiece BPE model (used by synthetic archives and tests).
pub fn write_bpe_model(pieces: &[Piece], byte_fallback: bool) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn field_bytes(out: &mut Vec<u8>, num: u64, b: &[u8]) {
        varint(out, num << 3 | 2);
        varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
    fn field_varint(out: &mut Vec<u8>, num: u64, v: u64) {
        varint(out, num << 3);
        varint(out, v);
    }
    let mut out = Vec::new();
    for p in pieces {
        let mut m = Vec::new();
        field_bytes(&mut m, 1, p.piece.as_bytes());
        varint(&mut m, 2 << 3 | 5);
        m.extend_from_slice(&p.score.to_bits().to_le_bytes());
        let kind = match p.kind {
            PieceType::Normal => 1,
            PieceType::Unknown => 2,
            PieceType::Control => 3,
            PieceType::UserDefined => 4,
            PieceType::Unused => 5,
            PieceType::Byte => 6,
        };
        field_varint(&mut m, 3, kind);
        field_bytes(&mut out, 1, &m);
    }
    let mut trainer = Vec::new();
    field_varint(&mut trainer, 3, 2);
    field_varint(&mut trainer, 4, pieces.len() as u64);
    field_varint(&mut trainer, 35, byte_fallback as u64);
    field_bytes(&mut out, 2, &trainer);
    let mut norm = Vec::new();
    field_bytes(&mut norm, 1, b"identity");
    field_varint(&mut norm, 3, 1);
    field_varint(&mut norm, 4, 0);
    field_bytes(&mut out, 3, &norm);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let mut pieces = Piece::llama_specials();
        pieces.push(Piece::new("<extra_id_1>", 0.0, PieceType::UserDefined));
        pieces.push(Piece::new("▁a", -1.5, PieceType::Normal));
        let m = SpModel::parse(&write_bpe_model(&pieces, true), "t").unwrap();
        assert_eq!(m.pieces, pieces);
        assert!(m.byte_fallback && m.add_dummy_prefix && !m.remove_extra_whitespaces);
        assert_eq!(m.model_type_name(), "bpe");
        assert_eq!(m.extra_id_pieces(), vec![("<extra_id_1>".to_string(), 3)]);
        assert!(SpModel::parse(b"hello world, not a model", "t").is_err());
        assert!(SpModel::parse(b"", "t").is_err());
    }
}
