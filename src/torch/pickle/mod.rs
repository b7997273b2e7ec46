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

mod dcp;
mod objects;
mod vm;

pub use dcp::{load_dcp_metadata, load_tensor, DcpMetadata, DcpStorage, DcpTensor};

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
    /// `torch.Size`: called with a tuple, gives that tuple.
    TorchSize,
    /// A class whose instances are plain data (torch.distributed.checkpoint's metadata
    /// dataclasses): instantiated as a [`Value::Object`] holding the state BUILD gives it.
    DataClass(&'static str),
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
    /// An instance of an allow-listed data class and the state BUILD set.
    Object(Rc<RefCell<Object>>),
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
            Value::Object(o) => format!("a {} object", o.borrow().class),
            Value::Opaque(s) => s.to_string(),
        }
    }
}

/// An instance of a data class: its class name and its state (a dict of fields, or the
/// tuple a custom `__getstate__` returned), `None` until BUILD.
#[derive(Debug, Clone)]
struct Object {
    class: &'static str,
    state: Value,
}

/// Limits that keep a hostile pickle from exhausting memory.
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 24;

/// Runs `data` (a `data.pkl`) and returns the entries of the state dict it holds, in order.
/// A top-level dict with a `state_dict` key (a training checkpoint) is looked into.
pub fn load_state_dict(data: &[u8], member: &str) -> Result<Vec<(String, Entry)>> {
    run_with(data, member, |vm, top| vm.state_dict(top))
}

/// Runs the pickle `data` and hands its result to `f` before the VM is torn down.
fn run_with<T>(
    data: &[u8],
    member: &str,
    f: impl FnOnce(&Vm<'_>, Value) -> Result<T>,
) -> Result<T> {
    let mut vm = Vm {
        data,
        pos: 0,
        member,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        containers: Vec::new(),
    };
    let result = vm.run().and_then(|top| f(&vm, top));
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
                "truncated: an opcode's argument runs past the end of the pickle",
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
