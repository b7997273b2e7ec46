//! What a `torch.distributed.checkpoint` `.metadata` pickle says, read as data: the global
//! shape, dtype and chunks of every tensor key, and where each chunk is stored. Also the
//! bare tensor that each `.distcp` item is (`torch.save(tensor)`).

use super::*;

/// One tensor key of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcpTensor {
    pub key: String,
    pub dtype: DType,
    pub size: Vec<u64>,
    /// `(offsets, sizes)` of each chunk, in the order the metadata lists them.
    pub chunks: Vec<(Vec<u64>, Vec<u64>)>,
}

/// Where one item is stored (`MetadataIndex` → `_StorageInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcpStorage {
    pub fqn: String,
    /// The chunk's offsets (tensors); `None` for byte items.
    pub chunk: Option<Vec<u64>>,
    pub relative_path: String,
    pub offset: u64,
    pub length: u64,
    /// Stream transforms applied on save (torch ≥ 2.7 extensions, e.g. compression).
    pub transforms: Vec<String>,
}

/// The parts of a `.metadata` that locate the weights.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DcpMetadata {
    pub tensors: Vec<DcpTensor>,
    /// Keys of byte items (pickled objects such as `_extra_state`).
    pub bytes: Vec<String>,
    pub storage: Vec<DcpStorage>,
}

/// Runs a `.metadata` pickle (`member` names it in errors).
pub fn load_dcp_metadata(data: &[u8], member: &str) -> Result<DcpMetadata> {
    run_with(data, member, |vm, top| vm.dcp_metadata(top))
}

/// Runs the pickle of a `torch.save(tensor)` blob and returns the tensor.
pub fn load_tensor(data: &[u8], member: &str) -> Result<PickledTensor> {
    run_with(data, member, |vm, top| match top {
        Value::Tensor(t) => Ok((*t).clone()),
        other => Err(vm.err(
            vm.pos,
            format!("the item holds {}, not a tensor", other.describe()),
        )),
    })
}

impl Vm<'_> {
    fn dcp_metadata(&self, top: Value) -> Result<DcpMetadata> {
        let at = self.pos;
        let md = self.object(&top, "Metadata", "the file")?;
        let mut out = DcpMetadata::default();
        let sdm = self.field(&md, "state_dict_metadata")?;
        for (k, v) in self.dict_items(&sdm, "state_dict_metadata")? {
            let key = self.string(&k, "a state_dict_metadata key")?;
            let class = match &v {
                Value::Object(o) => o.borrow().class,
                other => {
                    return Err(
                        self.err(at, format!("`{key}` is described by {}", other.describe()))
                    )
                }
            };
            match class {
                "BytesStorageMetadata" => out.bytes.push(key),
                "TensorStorageMetadata" => out.tensors.push(self.dcp_tensor(key, &v)?),
                other => {
                    return Err(self.err(at, format!("`{key}` is described by a {other}")));
                }
            }
        }
        let storage = self.field(&md, "storage_data")?;
        for (k, v) in self.dict_items(&storage, "storage_data")? {
            let index = self.object(&k, "MetadataIndex", "a storage_data key")?;
            let fqn = self.string(&self.field(&index, "fqn")?, "MetadataIndex.fqn")?;
            let chunk = match self.opt_field(&index, "offset") {
                None | Some(Value::None) => None,
                Some(v) => Some(self.uint_tuple(&v, "MetadataIndex.offset", at)?),
            };
            let info = self.object(&v, "_StorageInfo", &format!("the storage of `{fqn}`"))?;
            let transforms = match self.opt_field(&info, "transform_descriptors") {
                None | Some(Value::None) => Vec::new(),
                Some(Value::List(l)) | Some(Value::Tuple(l)) => l
                    .borrow()
                    .iter()
                    .map(|t| self.string(t, "a transform descriptor"))
                    .collect::<Result<_>>()?,
                Some(other) => {
                    return Err(self.err(
                        at,
                        format!("transform descriptors are {}", other.describe()),
                    ))
                }
            };
            out.storage.push(DcpStorage {
                relative_path: self.string(
                    &self.field(&info, "relative_path")?,
                    "_StorageInfo.relative_path",
                )?,
                offset: self.uint(&self.field(&info, "offset")?, "_StorageInfo.offset", at)?,
                length: self.uint(&self.field(&info, "length")?, "_StorageInfo.length", at)?,
                fqn,
                chunk,
                transforms,
            });
        }
        Ok(out)
    }

    fn dcp_tensor(&self, key: String, v: &Value) -> Result<DcpTensor> {
        let at = self.pos;
        let what = format!("the metadata of `{key}`");
        let tsm = self.object(v, "TensorStorageMetadata", &what)?;
        let props = self.field(&tsm, "properties")?;
        let props = self.object(&props, "TensorProperties", &what)?;
        // TensorProperties pickles its fields as a tuple (dtype first); older releases as a dict.
        let dtype = match &props {
            Value::Tuple(t) => t.borrow().first().cloned().unwrap_or(Value::None),
            dict => self.field(dict, "dtype")?,
        };
        let dtype = match dtype {
            Value::Global(Global::TorchDType(d)) => d,
            other => return Err(self.err(at, format!("`{key}` has dtype {}", other.describe()))),
        };
        let size = self.uint_tuple(&self.field(&tsm, "size")?, "a tensor size", at)?;
        let chunks_v = self.field(&tsm, "chunks")?;
        let Value::List(list) = chunks_v else {
            return Err(self.err(at, format!("`{key}` has chunks that are not a list")));
        };
        let mut chunks = Vec::new();
        for c in list.borrow().iter() {
            let c = self.object(c, "ChunkStorageMetadata", &what)?;
            let offsets = self.uint_tuple(&self.field(&c, "offsets")?, "chunk offsets", at)?;
            let sizes = self.uint_tuple(&self.field(&c, "sizes")?, "chunk sizes", at)?;
            chunks.push((offsets, sizes));
        }
        Ok(DcpTensor {
            key,
            dtype,
            size,
            chunks,
        })
    }

    /// The state of `v`, which must be an instance of `class`.
    fn object(&self, v: &Value, class: &str, what: &str) -> Result<Value> {
        match v {
            Value::Object(o) if o.borrow().class == class => Ok(o.borrow().state.clone()),
            other => Err(self.err(
                self.pos,
                format!("{what} is {}, not a {class}", other.describe()),
            )),
        }
    }

    fn opt_field(&self, state: &Value, name: &str) -> Option<Value> {
        let Value::Dict(d) = state else {
            return None;
        };
        let d = d.borrow();
        d.iter().find_map(|(k, v)| match k {
            Value::Str(s) if s.as_ref() == name => Some(v.clone()),
            _ => None,
        })
    }

    fn field(&self, state: &Value, name: &str) -> Result<Value> {
        self.opt_field(state, name)
            .ok_or_else(|| self.err(self.pos, format!("a metadata object has no `{name}` field")))
    }

    fn dict_items(&self, v: &Value, what: &str) -> Result<Vec<(Value, Value)>> {
        match v {
            Value::Dict(d) => Ok(d.borrow().clone()),
            other => Err(self.err(
                self.pos,
                format!("{what} is {}, not a dict", other.describe()),
            )),
        }
    }

    fn string(&self, v: &Value, what: &str) -> Result<String> {
        match v {
            Value::Str(s) => Ok(s.to_string()),
            other => Err(self.err(
                self.pos,
                format!("{what} is {}, not a string", other.describe()),
            )),
        }
    }
}
