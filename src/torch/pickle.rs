//! A safe pickle virtual machine for torch checkpoints.
//!
//! It understands every opcode of protocols 0–5 that `torch.save` (and the objects NeMo and
//! TransformerEngine put in a state dict) can emit, but it never imports or calls anything:
//! a small allow-list of globals (`OrderedDict`, torch's tensor-rebuild helpers, storage
//! classes, dtypes, `_codecs.encode`) is interpreted as data; any other global becomes an
//! opaque value, and globals that can only mean code execution (`os.system`,
//! `builtins.eval`, …) make the whole file refused.
//!
//! Containers are reference-counted so that memoised objects mutated later stay shared,
//! as in Python; every container is registered and emptied when the VM finishes, which
//! breaks cycles and deep nesting before anything is dropped recursively.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// A storage referenced through a persistent id: `('storage', <class>, key, location, numel)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickledStorage {
    /// `None` for `UntypedStorage` (then `numel` counts bytes).
    pub dtype: Option<DType>,
    pub key: String,
    pub numel: u64,
}

impl PickledStorage {
    /// Size of the storage in bytes.
    pub fn nbytes(&self) -> Option<u64> {
        match self.dtype {
            Some(d) => self.numel.checked_mul(d.size() as u64),
            None => Some(self.numel),
        }
    }
}

/// A tensor as the pickle describes it (before it is located in the zip).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickledTensor {
    pub storage: PickledStorage,
    pub dtype: DType,
    /// Offset of the first element in the storage, in elements of `dtype`.
    pub storage_offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// One top-level entry of a state dict.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Tensor(PickledTensor),
    /// Anything that is not a tensor (None, a BytesIO, a number …), described in words.
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    Storage(Option<DType>),
    TorchDType(DType),
    CodecsEncode,
    BytesIO,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<RefCell<Vec<Value>>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(Rc<PickledStorage>),
    Tensor(Rc<PickledTensor>),
    /// Something we do not interpret; the text says what it was.
    Opaque(Rc<str>),
}

impl Value {
    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => {
                if *b {
                    "True".into()
                } else {
                    "False".into()
                }
            }
            Value::Int(i) => format!("the int {i}"),
            Value::Float(f) => format!("the float {f}"),
            Value::Str(_) => "a string".into(),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(g) => format!("{g:?}"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
            Value::Opaque(s) => s.to_string(),
        }
    }
}

/// Limits that keep a hostile pickle from exhausting memory.
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 24;

/// Runs `data` (a `data.pkl`) and returns the entries of the state dict it holds, in order.
/// A top-level dict with a `state_dict` key (a training checkpoint) is looked into.
pub fn load_state_dict(data: &[u8], member: &str) -> Result<Vec<(String, Entry)>> {
    let mut vm = Vm {
        data,
        pos: 0,
        member,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        containers: Vec::new(),
    };
    let result = vm.run().and_then(|top| vm.state_dict(top));
    vm.teardown();
    result
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    member: &'a str,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    containers: Vec<Value>,
}

impl<'a> Vm<'a> {
    fn err(&self, at: usize, msg: impl Into<String>) -> Error {
        Error::Pickle {
            member: self.member.to_string(),
            offset: at as u64,
            msg: msg.into(),
        }
    }

    fn take(&mut self, n: usize, at: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(
                at,
                "truncated: an opcode's argument runs past the end of data.pkl",
            )),
        }
    }
    fn u8(&mut self, at: usize) -> Result<u8> {
        Ok(self.take(1, at)?[0])
    }
    fn u16(&mut self, at: usize) -> Result<u16> {
        let b = self.take(2, at)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, at: usize) -> Result<u32> {
        let b = self.take(4, at)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, at: usize) -> Result<u64> {
        let b = self.take(8, at)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn line(&mut self, at: usize) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err(at, "truncated: text argument without a newline"))?;
        let s = std::str::from_utf8(&rest[..nl])
            .map_err(|_| self.err(at, "text argument is not UTF-8"))?;
        self.pos += nl + 1;
        Ok(s)
    }
    fn len_arg(&mut self, n: u64, at: usize) -> Result<usize> {
        let remaining = (self.data.len() - self.pos) as u64;
        if n > remaining {
            return Err(self.err(at, format!("length {n} exceeds the {remaining} bytes left")));
        }
        Ok(n as usize)
    }

    fn push(&mut self, v: Value, at: usize) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(at, "stack too deep"));
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self, at: usize) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(at, "stack underflow"));
        }
        Ok(self.stack.pop().expect("checked non-empty"))
    }
    fn top(&self, at: usize) -> Result<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(at, "stack underflow"));
        }
        Ok(self.stack.last().expect("checked non-empty"))
    }
    fn pop_mark(&mut self, at: usize) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err(at, "no mark on the stack"))?;
        Ok(self.stack.split_off(m))
    }
    fn new_tuple(&mut self, items: Vec<Value>) -> Value {
        let v = Value::Tuple(Rc::new(RefCell::new(items)));
        self.containers.push(v.clone());
        v
    }
    fn new_list(&mut self, items: Vec<Value>) -> Value {
        let v = Value::List(Rc::new(RefCell::new(items)));
        self.containers.push(v.clone());
        v
    }
    fn new_dict(&mut self) -> Value {
        let v = Value::Dict(Rc::new(RefCell::new(Vec::new())));
        self.containers.push(v.clone());
        v
    }
    fn memo_put(&mut self, key: u32, at: usize) -> Result<()> {
        if self.memo.len() >= MAX_MEMO {
            return Err(self.err(at, "memo too large"));
        }
        let v = self.top(at)?.clone();
        self.memo.insert(key, v);
        Ok(())
    }
    fn memo_get(&mut self, key: u32, at: usize) -> Result<()> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| self.err(at, format!("memo key {key} was never stored")))?;
        self.push(v, at)
    }

    fn run(&mut self) -> Result<Value> {
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
                    // State is never applied by running code: dicts keep their items,
                    // everything else stays what it was.
                    self.pop(at)?;
                    self.top(at)?;
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

    fn append(&mut self, target: &Value, items: Vec<Value>, at: usize) -> Result<()> {
        match target {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            Value::Opaque(_) => Ok(()),
            other => Err(self.err(at, format!("APPEND to {}", other.describe()))),
        }
    }

    fn set_items(&mut self, target: &Value, items: Vec<Value>, at: usize) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err(at, "SETITEMS with an odd number of values"));
        }
        match target {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            Value::Opaque(_) => Ok(()),
            other => Err(self.err(at, format!("SETITEM on {}", other.describe()))),
        }
    }

    fn global(&self, module: &str, name: &str, at: usize) -> Result<Value> {
        if is_forbidden(module, name) {
            return Err(self.err(
                at,
                format!("refused global `{module}.{name}`: a torch checkpoint never needs it (hostile file?)"),
            ));
        }
        let g = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
            ("torch", "UntypedStorage") => Global::Storage(None),
            ("_codecs", "encode") => Global::CodecsEncode,
            ("_io" | "io", "BytesIO") => Global::BytesIO,
            ("torch", n) if n.ends_with("Storage") => match DType::from_storage_class(n) {
                Some(d) => Global::Storage(Some(d)),
                None => {
                    return Ok(Value::Opaque(
                        format!("unsupported storage class torch.{n}").into(),
                    ))
                }
            },
            ("torch", n) => match DType::from_torch_name(n) {
                Some(d) => Global::TorchDType(d),
                None => return Ok(Value::Opaque(format!("torch.{n}").into())),
            },
            _ => return Ok(Value::Opaque(format!("{module}.{name}").into())),
        };
        Ok(Value::Global(g))
    }

    fn args_of(&self, args: &Value, at: usize) -> Result<Vec<Value>> {
        match args {
            Value::Tuple(t) => Ok(t.borrow().clone()),
            Value::None => Ok(Vec::new()),
            other => Err(self.err(
                at,
                format!("call arguments are {}, not a tuple", other.describe()),
            )),
        }
    }

    fn new_object(&mut self, cls: Value, args: Value, at: usize) -> Result<Value> {
        match cls {
            Value::Global(Global::OrderedDict) => Ok(self.new_dict()),
            Value::Global(Global::BytesIO) => Ok(Value::Opaque("an io.BytesIO".into())),
            Value::Opaque(name) => Ok(Value::Opaque(format!("a {name} object").into())),
            other => {
                let _ = args;
                Err(self.err(at, format!("cannot instantiate {}", other.describe())))
            }
        }
    }

    fn call(&mut self, func: Value, args: Value, at: usize) -> Result<Value> {
        let g = match func {
            Value::Global(g) => g,
            Value::Opaque(name) => {
                return Ok(Value::Opaque(format!("the result of {name}(…)").into()))
            }
            other => return Err(self.err(at, format!("cannot call {}", other.describe()))),
        };
        let a = self.args_of(&args, at)?;
        match g {
            Global::OrderedDict => {
                let d = self.new_dict();
                if let Some(Value::List(items)) = a.first() {
                    let pairs: Vec<Value> = items.borrow().clone();
                    for p in pairs {
                        if let Value::Tuple(kv) = p {
                            let kv = kv.borrow().clone();
                            self.set_items(&d, kv, at)?;
                        }
                    }
                }
                Ok(d)
            }
            Global::RebuildTensorV2 | Global::RebuildTensorV3 => self.rebuild_tensor(g, &a, at),
            Global::RebuildParameter | Global::RebuildParameterWithState => a
                .into_iter()
                .next()
                .ok_or_else(|| self.err(at, "_rebuild_parameter without data")),
            Global::RebuildFromTypeV2 => {
                let (Some(f), Some(inner)) = (a.first(), a.get(2)) else {
                    return Err(
                        self.err(at, "_rebuild_from_type_v2 needs (func, type, args, state)")
                    );
                };
                self.call(f.clone(), inner.clone(), at)
            }
            Global::CodecsEncode => match (a.first(), a.get(1)) {
                (Some(Value::Str(s)), Some(Value::Str(enc)))
                    if enc.as_ref() == "latin1" || enc.as_ref() == "latin-1" =>
                {
                    let bytes: Option<Vec<u8>> =
                        s.chars().map(|c| u8::try_from(c as u32).ok()).collect();
                    bytes
                        .map(|b| Value::Bytes(b.into()))
                        .ok_or_else(|| self.err(at, "latin1 string holds characters above 255"))
                }
                (Some(Value::Str(s)), _) => Ok(Value::Bytes(s.as_bytes().into())),
                _ => Err(self.err(at, "_codecs.encode needs a string")),
            },
            Global::BytesIO => Ok(Value::Opaque("an io.BytesIO".into())),
            Global::Storage(_) | Global::TorchDType(_) => Err(self.err(
                at,
                "storage classes and dtypes are not callable in a checkpoint",
            )),
        }
    }

    fn rebuild_tensor(&self, g: Global, a: &[Value], at: usize) -> Result<Value> {
        let min = if g == Global::RebuildTensorV3 { 7 } else { 6 };
        if a.len() < min {
            return Err(self.err(
                at,
                format!("{g:?} needs at least {min} arguments, got {}", a.len()),
            ));
        }
        let Value::Storage(storage) = &a[0] else {
            return Err(self.err(
                at,
                format!("tensor storage is {}, not a storage", a[0].describe()),
            ));
        };
        let storage_offset = self.uint(&a[1], "storage offset", at)?;
        let shape = self.uint_tuple(&a[2], "size", at)?;
        let stride = self.uint_tuple(&a[3], "stride", at)?;
        if shape.len() != stride.len() {
            return Err(self.err(
                at,
                format!(
                    "size has {} dims but stride has {}",
                    shape.len(),
                    stride.len()
                ),
            ));
        }
        let dtype = if g == Global::RebuildTensorV3 {
            match &a[6] {
                Value::Global(Global::TorchDType(d)) => *d,
                other => return Err(self.err(at, format!("tensor dtype is {}", other.describe()))),
            }
        } else {
            storage
                .dtype
                .ok_or_else(|| self.err(at, "_rebuild_tensor_v2 on an untyped storage"))?
        };
        Ok(Value::Tensor(Rc::new(PickledTensor {
            storage: (**storage).clone(),
            dtype,
            storage_offset,
            shape,
            stride,
        })))
    }

    fn uint(&self, v: &Value, what: &str, at: usize) -> Result<u64> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            other => Err(self.err(
                at,
                format!("{what} is {}, not a non-negative int", other.describe()),
            )),
        }
    }

    fn uint_tuple(&self, v: &Value, what: &str, at: usize) -> Result<Vec<u64>> {
        match v {
            Value::Tuple(t) => t.borrow().iter().map(|x| self.uint(x, what, at)).collect(),
            other => Err(self.err(at, format!("{what} is {}, not a tuple", other.describe()))),
        }
    }

    fn persistent_load(&self, pid: Value, at: usize) -> Result<Value> {
        let Value::Tuple(t) = pid else {
            return Err(self.err(
                at,
                format!("persistent id is {}, not a tuple", pid.describe()),
            ));
        };
        let t = t.borrow();
        match t.as_slice() {
            [Value::Str(tag), cls, Value::Str(key), _location, numel, ..]
                if tag.as_ref() == "storage" =>
            {
                let dtype = match cls {
                    Value::Global(Global::Storage(d)) => *d,
                    other => {
                        return Err(self.err(at, format!("storage class is {}", other.describe())))
                    }
                };
                let numel = self.uint(numel, "storage size", at)?;
                Ok(Value::Storage(Rc::new(PickledStorage {
                    dtype,
                    key: key.to_string(),
                    numel,
                })))
            }
            _ => Err(self.err(
                at,
                "persistent id is not ('storage', class, key, location, numel)",
            )),
        }
    }

    fn state_dict(&self, top: Value) -> Result<Vec<(String, Entry)>> {
        let Value::Dict(mut dict) = top else {
            return Err(self.err(
                self.pos,
                format!("the checkpoint holds {}, not a state dict", top.describe()),
            ));
        };
        let nested = dict.borrow().iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Dict(d)) if k.as_ref() == "state_dict" => Some(d.clone()),
            _ => None,
        });
        if let Some(d) = nested {
            dict = d;
        }
        let dict = dict.borrow();
        let mut out = Vec::with_capacity(dict.len());
        for (k, v) in dict.iter() {
            let Value::Str(name) = k else {
                return Err(self.err(
                    self.pos,
                    format!("state dict key is {}, not a string", k.describe()),
                ));
            };
            let entry = match v {
                Value::Tensor(t) => Entry::Tensor((**t).clone()),
                other => Entry::Other(other.describe()),
            };
            out.push((name.to_string(), entry));
        }
        Ok(out)
    }

    fn teardown(&mut self) {
        self.stack.clear();
        self.memo.clear();
        for c in self.containers.drain(..) {
            match c {
                Value::Tuple(v) | Value::List(v) => v.borrow_mut().clear(),
                Value::Dict(d) => d.borrow_mut().clear(),
                _ => {}
            }
        }
    }
}

fn long_le(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return Some(0);
    }
    if bytes.len() > 8 {
        return None;
    }
    let neg = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if neg { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Some(i64::from_le_bytes(buf))
}

/// Globals whose only use in a pickle is running code.
fn is_forbidden(module: &str, name: &str) -> bool {
    const MODULES: &[&str] = &[
        "os",
        "posix",
        "nt",
        "subprocess",
        "sys",
        "shutil",
        "socket",
        "importlib",
        "runpy",
        "code",
        "pty",
        "webbrowser",
        "ctypes",
        "multiprocessing",
        "signal",
        "pickle",
        "_pickle",
        "marshal",
        "types",
        "operator",
        "functools",
        "platform",
        "asyncio",
        "threading",
        "commands",
        "popen2",
    ];
    const SAFE_BUILTINS: &[&str] = &[
        "set",
        "frozenset",
        "bytearray",
        "bytes",
        "slice",
        "complex",
        "object",
        "int",
        "float",
        "str",
        "list",
        "dict",
        "tuple",
        "range",
        "bool",
    ];
    let root = module.split('.').next().unwrap_or(module);
    if MODULES.contains(&root) {
        return true;
    }
    if root == "builtins" || root == "__builtin__" {
        return !SAFE_BUILTINS.contains(&name);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &[u8]) -> Result<Vec<(String, Entry)>> {
        load_state_dict(p, "test")
    }

    #[test]
    fn refuses_os_system() {
        let p = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00echoq\x01\x85q\x02Rq\x03.";
        let e = run(p).unwrap_err().to_string();
        assert!(e.contains("refused global `os.system`"), "{e}");
        let p = b"cbuiltins\neval\n(S'1'\ntR.";
        assert!(run(p).unwrap_err().to_string().contains("builtins.eval"));
    }

    #[test]
    fn unknown_opcode_and_truncation() {
        let e = run(b"\x80\x02}\xff.").unwrap_err().to_string();
        assert!(
            e.contains("unknown opcode 0xff") && e.contains("at byte 3"),
            "{e}"
        );
        let e = run(b"\x80\x02}X\x10\x00\x00\x00ab")
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceeds"), "{e}");
        assert!(run(b"\x80\x02}")
            .unwrap_err()
            .to_string()
            .contains("no STOP"));
    }

    #[test]
    fn cycles_and_deep_nesting_do_not_crash() {
        // A list appended to itself.
        let p = b"\x80\x02]q\x00h\x00a}q\x01.";
        let _ = run(p);
        // 200k nested lists.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 200_000));
        p.extend(std::iter::repeat_n(b'a', 199_999));
        p.push(b'.');
        assert!(run(&p).is_err());
    }

    #[test]
    fn plain_dict_with_non_tensors() {
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01NX\x01\x00\x00\x00bK\x05u.";
        let sd = run(p).unwrap();
        assert_eq!(sd.len(), 2);
        assert_eq!(sd[0], ("a".into(), Entry::Other("None".into())));
    }
}
