//! What the pickle VM builds: allowed globals, calls, torch tensors and storages, and the
//! state dict found in the result; globals that mean code execution are refused here.

use super::*;

impl Vm<'_> {
    pub(super) fn global(&self, module: &str, name: &str, at: usize) -> Result<Value> {
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
            ("torch", "Size") => Global::TorchSize,
            ("torch.distributed.checkpoint.metadata", n) => {
                match DCP_CLASSES.iter().find(|&&c| c == n) {
                    Some(c) => Global::DataClass(c),
                    None => return Ok(Value::Opaque(format!("{module}.{name}").into())),
                }
            }
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo") => {
                Global::DataClass("_StorageInfo")
            }
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

    pub(super) fn args_of(&self, args: &Value, at: usize) -> Result<Vec<Value>> {
        match args {
            Value::Tuple(t) => Ok(t.borrow().clone()),
            Value::None => Ok(Vec::new()),
            other => Err(self.err(
                at,
                format!("call arguments are {}, not a tuple", other.describe()),
            )),
        }
    }

    pub(super) fn new_object(&mut self, cls: Value, args: Value, at: usize) -> Result<Value> {
        match cls {
            Value::Global(Global::OrderedDict) => Ok(self.new_dict()),
            Value::Global(Global::BytesIO) => Ok(Value::Opaque("an io.BytesIO".into())),
            Value::Global(Global::DataClass(class)) => {
                let v = Value::Object(Rc::new(RefCell::new(Object {
                    class,
                    state: Value::None,
                })));
                self.containers.push(v.clone());
                Ok(v)
            }
            Value::Opaque(name) => Ok(Value::Opaque(format!("a {name} object").into())),
            other => {
                let _ = args;
                Err(self.err(at, format!("cannot instantiate {}", other.describe())))
            }
        }
    }

    pub(super) fn call(&mut self, func: Value, args: Value, at: usize) -> Result<Value> {
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
            Global::TorchSize => match a.into_iter().next() {
                Some(t @ Value::Tuple(_)) => Ok(t),
                Some(Value::List(l)) => {
                    let items = l.borrow().clone();
                    Ok(self.new_tuple(items))
                }
                _ => Err(self.err(at, "torch.Size needs a tuple")),
            },
            Global::DataClass(_) => {
                let cls = Value::Global(g);
                self.new_object(cls, Value::None, at)
            }
            Global::Storage(_) | Global::TorchDType(_) => Err(self.err(
                at,
                "storage classes and dtypes are not callable in a checkpoint",
            )),
        }
    }

    pub(super) fn rebuild_tensor(&self, g: Global, a: &[Value], at: usize) -> Result<Value> {
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

    pub(super) fn uint(&self, v: &Value, what: &str, at: usize) -> Result<u64> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            other => Err(self.err(
                at,
                format!("{what} is {}, not a non-negative int", other.describe()),
            )),
        }
    }

    pub(super) fn uint_tuple(&self, v: &Value, what: &str, at: usize) -> Result<Vec<u64>> {
        match v {
            Value::Tuple(t) => t.borrow().iter().map(|x| self.uint(x, what, at)).collect(),
            other => Err(self.err(at, format!("{what} is {}, not a tuple", other.describe()))),
        }
    }

    pub(super) fn persistent_load(&self, pid: Value, at: usize) -> Result<Value> {
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

    pub(super) fn state_dict(&self, top: Value) -> Result<Vec<(String, Entry)>> {
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

    pub(super) fn teardown(&mut self) {
        self.stack.clear();
        self.memo.clear();
        for c in self.containers.drain(..) {
            match c {
                Value::Tuple(v) | Value::List(v) => v.borrow_mut().clear(),
                Value::Dict(d) => d.borrow_mut().clear(),
                Value::Object(o) => o.borrow_mut().state = Value::None,
                _ => {}
            }
        }
    }
}

pub(super) fn long_le(bytes: &[u8]) -> Option<i64> {
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

/// The dataclasses of `torch.distributed.checkpoint.metadata` a `.metadata` file holds.
const DCP_CLASSES: &[&str] = &[
    "Metadata",
    "TensorStorageMetadata",
    "TensorProperties",
    "ChunkStorageMetadata",
    "BytesStorageMetadata",
    "MetadataIndex",
    "StorageMeta",
];

/// Globals whose only use in a pickle is running code.
pub(super) fn is_forbidden(module: &str, name: &str) -> bool {
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
