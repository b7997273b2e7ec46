//! Where the forward pass runs. One interface, [`Session`] (a KV cache and the buffers of
//! one sequence), over the CPU runtime and the CUDA one, so that loading, the template,
//! stopping and sampling are shared code: `generate`, `verify` and `serve` ask the model
//! for a session and feed it tokens.

use crate::container::mapped::Mapped;
use crate::runtime::llama::{Cache, Weights};
use crate::runtime::load::Model;
use crate::{Error, Result};

/// One sequence's state on a device: positions so far, and room for more.
pub trait Session {
    /// Runs `tokens` at the next positions and writes the logits of the last one
    /// (`vocab` values) to `logits`.
    fn forward_into(&mut self, tokens: &[u32], logits: &mut [f32]) -> Result<()>;

    /// Positions run so far.
    fn len(&self) -> usize;

    /// Whether no position has run yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The CPU runtime's session: the weights in place in the mapped files, a KV cache.
pub struct CpuSession<'a> {
    weights: &'a Weights,
    archive: &'a Mapped,
    cache: Cache,
}

impl Session for CpuSession<'_> {
    fn forward_into(&mut self, tokens: &[u32], logits: &mut [f32]) -> Result<()> {
        self.weights
            .forward_into(self.archive, &mut self.cache, tokens, logits);
        Ok(())
    }

    fn len(&self) -> usize {
        self.cache.len
    }
}

/// What `--device` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The GPU when one can be used, else the CPU (with the reason on stderr).
    Auto,
    Cpu,
    /// The GPU, or an error saying why not.
    Cuda,
}

impl DeviceChoice {
    /// Settles `Auto` before any work: `Cuda` when a GPU can be opened, else `Cpu` (with
    /// the reason on stderr unless `quiet`). `Cuda` that cannot be opened is an error with
    /// the one-line reason, at once rather than after the model is loaded.
    pub fn resolve(self, quiet: bool) -> Result<DeviceChoice> {
        if self == DeviceChoice::Cpu {
            return Ok(self);
        }
        match probe() {
            Ok(()) => Ok(DeviceChoice::Cuda),
            Err(why) if self == DeviceChoice::Auto => {
                if !quiet {
                    eprintln!("no GPU used ({why}); computing on the CPU");
                }
                Ok(DeviceChoice::Cpu)
            }
            Err(why) => Err(Error::Usage(format!("--device cuda: {why}"))),
        }
    }
}

#[cfg(feature = "cuda")]
fn probe() -> std::result::Result<(), String> {
    crate::gpu::open_context().map(|_| ())
}

#[cfg(not(feature = "cuda"))]
fn probe() -> std::result::Result<(), String> {
    Err("this build has no CUDA runtime (built without the `cuda` feature)".into())
}

/// Where a model's forward pass runs.
pub enum Backend {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::runtime::device::DeviceModel<crate::runtime::cuda::model::CudaOps>>),
}

impl Model {
    /// A fresh session with room for `positions` positions (at most the context).
    pub fn session(&self, positions: usize) -> Result<Box<dyn Session + '_>> {
        let positions = positions.min(self.weights.dims.max_positions).max(1);
        match &self.backend {
            Backend::Cpu => {
                let mut cache = self.weights.new_cache();
                // The whole run's positions at once: decoding then never grows the cache.
                cache.reserve(positions);
                Ok(Box::new(CpuSession {
                    weights: &self.weights,
                    archive: &self.archive,
                    cache,
                }))
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => Ok(Box::new(m.session(positions)?)),
        }
    }

    /// Where the forward pass runs, in a few words.
    pub fn device_name(&self) -> String {
        match &self.backend {
            Backend::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => m.ops.name.clone(),
        }
    }

    /// Moves the forward pass to the device `choice` asks for. `Auto` falls back to the
    /// CPU and returns why; `Cuda` fails with the one-line reason the GPU cannot be used.
    pub fn select_device(
        &mut self,
        choice: DeviceChoice,
        progress: bool,
    ) -> Result<Option<String>> {
        if choice == DeviceChoice::Cpu {
            self.backend = Backend::Cpu;
            return Ok(None);
        }
        match self.upload(progress) {
            Ok(b) => {
                self.backend = b;
                Ok(None)
            }
            Err(why) if choice == DeviceChoice::Auto => Ok(Some(why)),
            Err(why) => Err(Error::Usage(format!("--device cuda: {why}"))),
        }
    }

    #[cfg(feature = "cuda")]
    fn upload(&self, progress: bool) -> std::result::Result<Backend, String> {
        let m = crate::runtime::cuda::model::upload(self, progress)?;
        Ok(Backend::Cuda(Box::new(m)))
    }

    #[cfg(not(feature = "cuda"))]
    fn upload(&self, _progress: bool) -> std::result::Result<Backend, String> {
        Err("this build has no CUDA runtime (built without the `cuda` feature)".into())
    }
}
