//! A `torch.save` writer: pickle protocol 2 (`OrderedDict`, `_rebuild_tensor_v2`,
//! `<Dtype>Storage` persistent ids) inside a zip whose records are stored uncompressed
//! with data aligned to 64 bytes, as torch writes it, so that `torch.load` and our reader
//! both read it. Storage bytes are streamed; sizes are planned up front so that the file
//! can be embedded in a tar member whose size must be known first.

use std::io::{self, Seek, SeekFrom, Write};

use crate::dtype::DType;

const ALIGN: u64 = 64;

/// A value in a state dict to be written.
#[derive(Debug, Clone)]
pub enum SaveEntry {
    /// A contiguous tensor stored in its own storage `data/<index>`.
    Tensor { dtype: DType, shape: Vec<u64> },
    /// Python `None` (e.g. megatron-core `_extra_state`).
    None,
}

/// Serialises the pickle of a state dict whose tensors use storages `0, 1, …` in order.
pub fn state_dict_pickle(entries: &[(String, SaveEntry)]) -> Vec<u8> {
    let mut p = Pickler { out: vec![0x80, 2] };
    p.global("collections", "OrderedDict");
    p.out.push(b')');
    p.out.push(b'R');
    p.out.push(b'(');
    let mut key = 0u64;
    for (name, e) in entries {
        p.string(name);
        match e {
            SaveEntry::None => p.out.push(b'N'),
            SaveEntry::Tensor { dtype, shape } => {
                p.global("torch._utils", "_rebuild_tensor_v2");
                p.out.push(b'(');
                // Persistent id ('storage', torch.<Dtype>Storage, key, 'cpu', numel).
                p.out.push(b'(');
                p.string("storage");
                p.global("torch", dtype.storage_class().unwrap_or("ByteStorage"));
                p.string(&key.to_string());
                p.string("cpu");
                p.int(shape.iter().product());
                p.out.push(b't');
                p.out.push(b'Q');
                p.int(0);
                p.tuple_of_ints(shape);
                p.tuple_of_ints(&crate::dtype::contiguous_strides(shape));
                p.out.push(0x89);
                p.global("collections", "OrderedDict");
                p.out.push(b')');
                p.out.push(b'R');
                p.out.push(b't');
                p.out.push(b'R');
                key += 1;
            }
        }
    }
    p.out.push(b'u');
    p.out.push(b'.');
    p.out
}

struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }
    fn string(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: u64) {
        if v < 256 {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if v < 65536 {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v < (1 << 31) {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            let mut bytes = v.to_le_bytes().to_vec();
            while bytes.len() > 1
                && bytes[bytes.len() - 1] == 0
                && bytes[bytes.len() - 2] & 0x80 == 0
            {
                bytes.pop();
            }
            if bytes[bytes.len() - 1] & 0x80 != 0 {
                bytes.push(0);
            }
            self.out.extend_from_slice(&[0x8a, bytes.len() as u8]);
            self.out.extend_from_slice(&bytes);
        }
    }
    fn tuple_of_ints(&mut self, v: &[u64]) {
        self.out.push(b'(');
        for &x in v {
            self.int(x);
        }
        self.out.push(b't');
    }
}

/// Where each record goes; computed before anything is written.
#[derive(Debug, Clone)]
pub struct ZipPlan {
    records: Vec<PlannedRecord>,
    central_offset: u64,
    total: u64,
}

#[derive(Debug, Clone)]
struct PlannedRecord {
    name: String,
    size: u64,
    header_offset: u64,
    header_len: u64,
    data_offset: u64,
    zip64: bool,
}

impl ZipPlan {
    /// Lays out records `(name, size)` in order.
    pub fn new(records: &[(String, u64)]) -> ZipPlan {
        let mut pos = 0u64;
        let mut planned = Vec::with_capacity(records.len());
        for (name, size) in records {
            let zip64 = *size >= 0xFFFF_FFFF || pos >= 0xFFFF_FFFF;
            let fixed = 30 + name.len() as u64 + if zip64 { 20 } else { 0 };
            // The "FB" padding field needs 4 bytes of its own header.
            let pad = (ALIGN - (pos + fixed + 4) % ALIGN) % ALIGN;
            let header_len = fixed + 4 + pad;
            planned.push(PlannedRecord {
                name: name.clone(),
                size: *size,
                header_offset: pos,
                header_len,
                data_offset: pos + header_len,
                zip64,
            });
            pos += header_len + size;
        }
        let central_offset = pos;
        let mut central = 0u64;
        for r in &planned {
            central += 46
                + r.name.len() as u64
                + if r.zip64 || r.header_offset >= 0xFFFF_FFFF {
                    28
                } else {
                    0
                };
        }
        let needs_zip64_end = central_offset + central >= 0xFFFF_FFFF || planned.len() >= 0xFFFF;
        let total = central_offset + central + if needs_zip64_end { 56 + 20 } else { 0 } + 22;
        ZipPlan {
            records: planned,
            central_offset,
            total,
        }
    }

    /// Size of the whole zip in bytes.
    pub fn total_size(&self) -> u64 {
        self.total
    }

    /// Offset (from the zip start) of record `i`'s data.
    pub fn data_offset(&self, i: usize) -> u64 {
        self.records[i].data_offset
    }
}

/// Writes a planned zip into `w`, whose current position is the zip's start.
pub struct ZipWriter<'a, W: Write + Seek> {
    w: &'a mut W,
    base: u64,
    plan: ZipPlan,
    next: usize,
    crcs: Vec<u32>,
}

impl<'a, W: Write + Seek> ZipWriter<'a, W> {
    pub fn new(w: &'a mut W, plan: ZipPlan) -> io::Result<Self> {
        let base = w.stream_position()?;
        Ok(ZipWriter {
            w,
            base,
            plan,
            next: 0,
            crcs: Vec::new(),
        })
    }

    /// Writes the next record; `fill` must write exactly the planned number of bytes.
    pub fn record(
        &mut self,
        fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()> {
        let r = self
            .plan
            .records
            .get(self.next)
            .cloned()
            .ok_or_else(|| io::Error::other("more zip records than planned"))?;
        self.w.seek(SeekFrom::Start(self.base + r.header_offset))?;
        let header = local_header(&r, 0);
        self.w.write_all(&header)?;
        let mut cw = CrcWriter {
            inner: &mut *self.w,
            crc: crc32fast::Hasher::new(),
            n: 0,
        };
        fill(&mut cw)?;
        let (crc, n) = (cw.crc.finalize(), cw.n);
        if n != r.size {
            return Err(io::Error::other(format!(
                "zip record `{}`: wrote {n} bytes, planned {}",
                r.name, r.size
            )));
        }
        self.w
            .seek(SeekFrom::Start(self.base + r.header_offset + 14))?;
        self.w.write_all(&crc.to_le_bytes())?;
        self.w
            .seek(SeekFrom::Start(self.base + r.data_offset + r.size))?;
        self.crcs.push(crc);
        self.next += 1;
        Ok(())
    }

    /// Writes the central directory and end records.
    pub fn finish(self) -> io::Result<()> {
        if self.next != self.plan.records.len() {
            return Err(io::Error::other("fewer zip records than planned"));
        }
        let mut c = Vec::new();
        for (r, crc) in self.plan.records.iter().zip(&self.crcs) {
            let big = r.zip64 || r.header_offset >= 0xFFFF_FFFF;
            c.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            c.extend_from_slice(&(if big { 45u16 } else { 20 }).to_le_bytes());
            c.extend_from_slice(&(if big { 45u16 } else { 20 }).to_le_bytes());
            c.extend_from_slice(&0u16.to_le_bytes());
            c.extend_from_slice(&0u16.to_le_bytes());
            c.extend_from_slice(&0u16.to_le_bytes());
            c.extend_from_slice(&0x21u16.to_le_bytes());
            c.extend_from_slice(&crc.to_le_bytes());
            let sz = if big { 0xFFFF_FFFF } else { r.size as u32 };
            c.extend_from_slice(&sz.to_le_bytes());
            c.extend_from_slice(&sz.to_le_bytes());
            c.extend_from_slice(&(r.name.len() as u16).to_le_bytes());
            c.extend_from_slice(&(if big { 28u16 } else { 0 }).to_le_bytes());
            c.extend_from_slice(&[0; 6]);
            c.extend_from_slice(&0u32.to_le_bytes());
            let off = if big {
                0xFFFF_FFFF
            } else {
                r.header_offset as u32
            };
            c.extend_from_slice(&off.to_le_bytes());
            c.extend_from_slice(r.name.as_bytes());
            if big {
                c.extend_from_slice(&1u16.to_le_bytes());
                c.extend_from_slice(&24u16.to_le_bytes());
                c.extend_from_slice(&r.size.to_le_bytes());
                c.extend_from_slice(&r.size.to_le_bytes());
                c.extend_from_slice(&r.header_offset.to_le_bytes());
            }
        }
        let n = self.plan.records.len() as u64;
        let cd_size = c.len() as u64;
        let cd_off = self.plan.central_offset;
        let zip64_end = cd_off + cd_size >= 0xFFFF_FFFF || n >= 0xFFFF;
        if zip64_end {
            let z = cd_off + cd_size;
            c.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
            c.extend_from_slice(&44u64.to_le_bytes());
            c.extend_from_slice(&45u16.to_le_bytes());
            c.extend_from_slice(&45u16.to_le_bytes());
            c.extend_from_slice(&[0; 8]);
            c.extend_from_slice(&n.to_le_bytes());
            c.extend_from_slice(&n.to_le_bytes());
            c.extend_from_slice(&cd_size.to_le_bytes());
            c.extend_from_slice(&cd_off.to_le_bytes());
            c.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
            c.extend_from_slice(&0u32.to_le_bytes());
            c.extend_from_slice(&z.to_le_bytes());
            c.extend_from_slice(&1u32.to_le_bytes());
        }
        c.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        c.extend_from_slice(&[0; 4]);
        let n16 = if zip64_end { 0xFFFF } else { n as u16 };
        c.extend_from_slice(&n16.to_le_bytes());
        c.extend_from_slice(&n16.to_le_bytes());
        let (s32, o32) = if zip64_end {
            (0xFFFF_FFFF, 0xFFFF_FFFF)
        } else {
            (cd_size as u32, cd_off as u32)
        };
        c.extend_from_slice(&s32.to_le_bytes());
        c.extend_from_slice(&o32.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes());
        self.w.seek(SeekFrom::Start(self.base + cd_off))?;
        self.w.write_all(&c)?;
        debug_assert_eq!(cd_off + c.len() as u64, self.plan.total);
        Ok(())
    }
}

fn local_header(r: &PlannedRecord, crc: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(r.header_len as usize);
    h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    h.extend_from_slice(&(if r.zip64 { 45u16 } else { 20 }).to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&0x21u16.to_le_bytes());
    h.extend_from_slice(&crc.to_le_bytes());
    let sz = if r.zip64 { 0xFFFF_FFFF } else { r.size as u32 };
    h.extend_from_slice(&sz.to_le_bytes());
    h.extend_from_slice(&sz.to_le_bytes());
    h.extend_from_slice(&(r.name.len() as u16).to_le_bytes());
    let extra_len = r.header_len - 30 - r.name.len() as u64;
    h.extend_from_slice(&(extra_len as u16).to_le_bytes());
    h.extend_from_slice(r.name.as_bytes());
    if r.zip64 {
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&16u16.to_le_bytes());
        h.extend_from_slice(&r.size.to_le_bytes());
        h.extend_from_slice(&r.size.to_le_bytes());
    }
    let pad = r.header_len as usize - h.len() - 4;
    h.extend_from_slice(&0x4246u16.to_le_bytes());
    h.extend_from_slice(&(pad as u16).to_le_bytes());
    h.resize(r.header_len as usize, 0);
    h
}

struct CrcWriter<'a, W: Write> {
    inner: &'a mut W,
    crc: crc32fast::Hasher,
    n: u64,
}

impl<W: Write> Write for CrcWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A torch checkpoint to be written: its zip root, pickle and storage sizes.
pub struct TorchFile {
    plan: ZipPlan,
    pickle: Vec<u8>,
    storages: usize,
}

impl TorchFile {
    /// Plans a checkpoint named `root` (torch uses the file name without extension).
    pub fn new(root: &str, entries: &[(String, SaveEntry)]) -> TorchFile {
        let pickle = state_dict_pickle(entries);
        let mut records = vec![
            (format!("{root}/data.pkl"), pickle.len() as u64),
            (format!("{root}/byteorder"), 6),
        ];
        let mut storages = 0;
        for (_, e) in entries {
            if let SaveEntry::Tensor { dtype, shape } = e {
                let bytes = shape.iter().product::<u64>() * dtype.size() as u64;
                records.push((format!("{root}/data/{storages}"), bytes));
                storages += 1;
            }
        }
        records.push((format!("{root}/version"), 2));
        records.push((format!("{root}/.data/serialization_id"), 20));
        TorchFile {
            plan: ZipPlan::new(&records),
            pickle,
            storages,
        }
    }

    /// Size of the file in bytes.
    pub fn size(&self) -> u64 {
        self.plan.total_size()
    }

    /// Writes the file at `w`'s position; `write_storage(i, out)` writes storage `i`'s bytes.
    pub fn write<W: Write + Seek>(
        &self,
        w: &mut W,
        mut write_storage: impl FnMut(usize, &mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut z = ZipWriter::new(w, self.plan.clone())?;
        z.record(|o| o.write_all(&self.pickle))?;
        z.record(|o| o.write_all(b"little"))?;
        for i in 0..self.storages {
            z.record(|o| write_storage(i, o))?;
        }
        z.record(|o| o.write_all(b"3\n"))?;
        z.record(|o| o.write_all(b"00000000000000000000"))?;
        z.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::torch::state_dict::{StateDict, StateEntry};

    #[test]
    fn write_then_read() {
        let entries = vec![
            (
                "a.weight".to_string(),
                SaveEntry::Tensor {
                    dtype: DType::BF16,
                    shape: vec![3, 5],
                },
            ),
            ("a._extra_state".to_string(), SaveEntry::None),
            (
                "b".to_string(),
                SaveEntry::Tensor {
                    dtype: DType::F32,
                    shape: vec![70000],
                },
            ),
        ];
        let f = TorchFile::new("mp_rank_00_model_weights", &entries);
        let mut cur = io::Cursor::new(Vec::new());
        f.write(&mut cur, |i, o| {
            let n = if i == 0 { 30 } else { 280000 };
            o.write_all(&vec![i as u8 + 1; n])
        })
        .unwrap();
        let bytes = cur.into_inner();
        assert_eq!(bytes.len() as u64, f.size());
        let sd = StateDict::read(&bytes, 0, "m").unwrap();
        assert_eq!(sd.zip_root, "mp_rank_00_model_weights");
        assert_eq!(sd.entries[1].1, StateEntry::Other("None".into()));
        let t: Vec<_> = sd.tensors().collect();
        assert_eq!(t[0].1.shape, vec![3, 5]);
        assert_eq!(t[0].1.offset % 64, 0);
        assert_eq!(&bytes[t[1].1.offset as usize..][..4], &[2, 2, 2, 2]);
        assert_eq!(t[1].1.nbytes(), 280000);
    }
}
