//! The opcode loop of the pickle VM: one arm per opcode, nothing else.

use super::objects::long_le;
use super::*;

impl Vm<'_> {
    pub(super) fn run(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self
                .u8(at)
                .map_err(|_| self.err(at, "truncated: no STOP opcode"))?;
            match op {
                0x80 => {
                    let proto = self.u8(at)?;
                    if proto > 5 {
                        return Err(self.err(at, format!("unsupported pickle protocol {proto}")));
                    }
                }
                0x95 => {
                    self.u64(at)?;
                }
                b'.' => return self.pop(at),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop(at)?;
                }
                b'1' => {
                    self.pop_mark(at)?;
                }
                b'2' => {
                    let v = self.top(at)?.clone();
                    self.push(v, at)?;
                }
                b'N' => self.push(Value::None, at)?,
                0x88 => self.push(Value::Bool(true), at)?,
                0x89 => self.push(Value::Bool(false), at)?,
                b'J' => {
                    let v = self.u32(at)? as i32 as i64;
                    self.push(Value::Int(v), at)?
                }
                b'K' => {
                    let v = self.u8(at)? as i64;
                    self.push(Value::Int(v), at)?
                }
                b'M' => {
                    let v = self.u16(at)? as i64;
                    self.push(Value::Int(v), at)?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8(at)? as u64
                    } else {
                        self.u32(at)? as u64
                    };
                    let n = self.len_arg(n, at)?;
                    let bytes = self.take(n, at)?;
                    let v = long_le(bytes)
                        .map(Value::Int)
                        .unwrap_or_else(|| Value::Opaque("a big int".into()));
                    self.push(v, at)?
                }
                b'I' | b'L' => {
                    let s = self.line(at)?;
                    let v = match s.trim_end_matches('L') {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        t => t
                            .parse()
                            .map(Value::Int)
                            .unwrap_or_else(|_| Value::Opaque("a big int".into())),
                    };
                    self.push(v, at)?
                }
                b'G' => {
                    let b = self.take(8, at)?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.push(Value::Float(v), at)?
                }
                b'F' => {
                    let s = self.line(at)?;
                    let v = s
                        .parse()
                        .map_err(|_| self.err(at, "FLOAT argument is not a number"))?;
                    self.push(Value::Float(v), at)?
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32(at)? as u64,
                        0x8c => self.u8(at)? as u64,
                        _ => self.u64(at)?,
                    };
                    let n = self.len_arg(n, at)?;
                    let b = self.take(n, at)?;
                    let s =
                        std::str::from_utf8(b).map_err(|_| self.err(at, "string is not UTF-8"))?;
                    self.push(Value::Str(s.into()), at)?
                }
                b'V' => {
                    let s = self.line(at)?.to_string();
                    self.push(Value::Str(s.into()), at)?
                }
                b'S' => {
                    let s = self.line(at)?;
                    let s = s.trim_matches(|c| c == '\'' || c == '"').to_string();
                    self.push(Value::Str(s.into()), at)?
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'T' | b'B' => self.u32(at)? as u64,
                        b'U' | b'C' => self.u8(at)? as u64,
                        _ => self.u64(at)?,
                    };
                    let n = self.len_arg(n, at)?;
                    let b = self.take(n, at)?;
                    let v = if op == b'T' || op == b'U' {
                        Value::Str(String::from_utf8_lossy(b).into())
                    } else {
                        Value::Bytes(b.into())
                    };
                    self.push(v, at)?
                }
                b')' => {
                    let t = self.new_tuple(Vec::new());
                    self.push(t, at)?
                }
                b't' => {
                    let items = self.pop_mark(at)?;
                    let t = self.new_tuple(items);
                    self.push(t, at)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at)?);
                    }
                    items.reverse();
                    let t = self.new_tuple(items);
                    self.push(t, at)?
                }
                b']' | 0x8f => {
                    let l = self.new_list(Vec::new());
                    self.push(l, at)?
                }
                b'l' => {
                    let items = self.pop_mark(at)?;
                    let l = self.new_list(items);
                    self.push(l, at)?
                }
                0x91 => {
                    let items = self.pop_mark(at)?;
                    let l = self.new_list(items);
                    self.push(l, at)?
                }
                b'}' => {
                    let d = self.new_dict();
                    self.push(d, at)?
                }
                b'd' => {
                    let items = self.pop_mark(at)?;
                    let d = self.new_dict();
                    self.set_items(&d, items, at)?;
                    self.push(d, at)?
                }
                b'a' => {
                    let v = self.pop(at)?;
                    let target = self.top(at)?.clone();
                    self.append(&target, vec![v], at)?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark(at)?;
                    let target = self.top(at)?.clone();
                    self.append(&target, items, at)?;
                }
                b's' => {
                    let v = self.pop(at)?;
                    let k = self.pop(at)?;
                    let target = self.top(at)?.clone();
                    self.set_items(&target, vec![k, v], at)?;
                }
                b'u' => {
                    let items = self.pop_mark(at)?;
                    let target = self.top(at)?.clone();
                    self.set_items(&target, items, at)?;
                }
                b'q' => {
                    let k = self.u8(at)? as u32;
                    self.memo_put(k, at)?
                }
                b'r' => {
                    let k = self.u32(at)?;
                    self.memo_put(k, at)?
                }
                b'p' => {
                    let k = self
                        .line(at)?
                        .parse()
                        .map_err(|_| self.err(at, "PUT key is not a number"))?;
                    self.memo_put(k, at)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k, at)?
                }
                b'h' => {
                    let k = self.u8(at)? as u32;
                    self.memo_get(k, at)?
                }
                b'j' => {
                    let k = self.u32(at)?;
                    self.memo_get(k, at)?
                }
                b'g' => {
                    let k = self
                        .line(at)?
                        .parse()
                        .map_err(|_| self.err(at, "GET key is not a number"))?;
                    self.memo_get(k, at)?
                }
                b'c' => {
                    let module = self.line(at)?;
                    let name = self.line(at)?;
                    let g = self.global(module, name, at)?;
                    self.push(g, at)?
                }
                0x93 => {
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.err(at, "STACK_GLOBAL needs two strings"));
                    };
                    let g = self.global(&module, &name, at)?;
                    self.push(g, at)?
                }
                b'R' => {
                    let args = self.pop(at)?;
                    let func = self.pop(at)?;
                    let v = self.call(func, args, at)?;
                    self.push(v, at)?
                }
                0x81 => {
                    let args = self.pop(at)?;
                    let cls = self.pop(at)?;
                    let v = self.new_object(cls, args, at)?;
                    self.push(v, at)?
                }
                0x92 => {
                    self.pop(at)?;
                    let args = self.pop(at)?;
                    let cls = self.pop(at)?;
                    let v = self.new_object(cls, args, at)?;
                    self.push(v, at)?
                }
                b'i' => {
                    let module = self.line(at)?;
                    let name = self.line(at)?;
                    self.global(module, name, at)?;
                    self.pop_mark(at)?;
                    self.push(
                        Value::Opaque(format!("a {module}.{name} instance").into()),
                        at,
                    )?
                }
                b'o' => {
                    let mut items = self.pop_mark(at)?;
                    if items.is_empty() {
                        return Err(self.err(at, "OBJ without a class"));
                    }
                    let cls = items.remove(0);
                    let v = self.new_object(cls, Value::None, at)?;
                    self.push(v, at)?
                }
                b'b' => {
                    // State is never applied by running code: a data class keeps it as
                    // data, dicts keep their items, everything else stays what it was.
                    let state = self.pop(at)?;
                    if let Value::Object(o) = self.top(at)? {
                        o.borrow_mut().state = state;
                    }
                }
                b'Q' => {
                    let pid = self.pop(at)?;
                    let v = self.persistent_load(pid, at)?;
                    self.push(v, at)?
                }
                b'P' => return Err(self.err(at, "text persistent ids are not used by torch")),
                0x82..=0x84 => {
                    return Err(self.err(at, "extension-registry opcodes are not used by torch"))
                }
                0x97 => return Err(self.err(at, "out-of-band buffers are not supported")),
                0x98 => {
                    self.top(at)?;
                }
                _ => return Err(self.err(at, format!("unknown opcode 0x{op:02x}"))),
            }
        }
    }
}
