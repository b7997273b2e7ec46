//! The Llama architecture: one typed configuration (whatever file it was read from), the
//! role table that says what each stored tensor is, and the tensor-parallel merge and
//! split rules.

pub mod roles;
pub mod tp;

use roles::{Kind, Role};

/// What legacy NeMo's `dense_h_to_4h` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// gate and up fused in one matrix per rank (`fast-swiglu`, mcore `linear_fc1`).
    FastSwiglu,
    /// gate (`dense_h_to_4h`) and up (`dense_h_to_4h_2`) as separate matrices.
    Swiglu,
}

impl Activation {
    pub fn as_str(self) -> &'static str {
        match self {
            Activation::FastSwiglu => "fast-swiglu",
            Activation::Swiglu => "swiglu",
        }
    }
}

/// How positions are scaled before the rotary embedding.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by the factor (NeMo's `seq_len_interpolation_factor`).
    Linear(f64),
    /// Llama 3.1's rule: long wavelengths divided by `factor`, short ones kept, and a
    /// smooth blend between (`rope_type: llama3`; NeMo's `scale_positional_embedding` /
    /// `scale_factor`, `low_freq_factor`, `high_freq_factor`, `old_context_len`).
    Llama3(Llama3Scaling),
    /// A rule the runtime does not implement (named as in `config.json`).
    Other(String),
}

/// The constants of Llama 3.1's RoPE scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    /// The context the model was first trained with (`original_max_position_embeddings`).
    pub original_max_positions: f64,
}

impl Llama3Scaling {
    /// megatron-core's fixed constants when a NeMo config only says
    /// `scale_positional_embedding: true` (factor 8, frequency factors 1 and 4, 8192).
    pub const MCORE_DEFAULT: Llama3Scaling = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_positions: 8192.0,
    };

    /// Applies the rule to `inv_freq` in float32, in transformers' order of operations.
    pub fn apply(&self, inv_freq: &mut [f32]) {
        let (factor, low, high) = (
            self.factor as f32,
            self.low_freq_factor as f32,
            self.high_freq_factor as f32,
        );
        let old = self.original_max_positions as f32;
        let (low_wavelen, high_wavelen) = (old / low, old / high);
        for f in inv_freq.iter_mut() {
            let wavelen = (2.0 * std::f64::consts::PI) as f32 / *f;
            let scaled = if wavelen > low_wavelen {
                *f / factor
            } else {
                *f
            };
            if wavelen >= high_wavelen && wavelen <= low_wavelen {
                let smooth = (old / wavelen - low) / (high - low);
                *f = (1.0 - smooth) * scaled / factor + smooth * scaled;
            } else {
                *f = scaled;
            }
        }
    }
}

/// A Llama model's shape and constants: the one configuration every reader produces
/// (`model_config.yaml`, `config.json`) and every writer and the runtime consume.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    /// Query groups (key/value heads).
    pub groups: u64,
    pub head_dim: u64,
    pub ffn: u64,
    pub eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Fraction of each head rotated (Llama: 1).
    pub rotary_percentage: f64,
    pub max_positions: u64,
    /// The output layer is the embedding (no `lm_head` stored).
    pub tied: bool,
    pub bias: bool,
    pub init_std: f64,
}

impl Arch {
    /// The TP = 1 shape of a kind (`vocab_rows` for vocabulary tensors).
    pub fn shape(&self, kind: Kind, vocab_rows: u64) -> Vec<u64> {
        let h = self.hidden;
        match kind {
            Kind::Embedding | Kind::Output => vec![vocab_rows, h],
            Kind::InputNorm | Kind::PostAttnNorm | Kind::FinalNorm => vec![h],
            Kind::Qkv => vec![(self.heads + 2 * self.groups) * self.head_dim, h],
            Kind::AttnOut => vec![h, self.heads * self.head_dim],
            Kind::GateUp => vec![2 * self.ffn, h],
            Kind::Gate | Kind::Up => vec![self.ffn, h],
            Kind::Down => vec![h, self.ffn],
            Kind::InvFreq | Kind::ExtraState => vec![],
        }
    }

    /// The shape one of `tp` ranks holds.
    pub fn rank_shape(&self, kind: Kind, vocab_rows: u64, tp: u64) -> Vec<u64> {
        let mut s = self.shape(kind, vocab_rows);
        match roles::role_of(kind) {
            Role::VocabRows | Role::ColumnRows | Role::QkvGrouped | Role::GateUpFused => s[0] /= tp,
            Role::RowCols => s[1] /= tp,
            Role::Replicated | Role::Skip => {}
        }
        s
    }

    /// Checks that `tp` can split this model (whole query groups, ffn and heads per rank).
    pub fn check_tp(&self, tp: u64) -> std::result::Result<(), String> {
        for (what, n) in [
            ("query groups", self.groups),
            ("attention heads", self.heads),
            ("ffn_hidden_size", self.ffn),
        ] {
            if !n.is_multiple_of(tp) {
                return Err(format!("{what} ({n}) is not divisible by TP {tp}"));
            }
        }
        Ok(())
    }

    /// The rotary frequencies of one head, before any scaling (what NeMo stores as
    /// `inv_freq`).
    pub fn inv_freq(&self) -> Vec<f32> {
        rope_inv_freq(self.rope_theta, self.head_dim / 2)
    }

    /// The rotary frequencies the forward pass uses: [`Arch::inv_freq`] with the scaling
    /// rule applied (an unknown rule is refused before this is asked).
    pub fn scaled_inv_freq(&self) -> Vec<f32> {
        let mut f = self.inv_freq();
        match &self.rope_scaling {
            RopeScaling::None | RopeScaling::Other(_) => {}
            RopeScaling::Linear(factor) => {
                let factor = *factor as f32;
                f.iter_mut().for_each(|v| *v /= factor);
            }
            RopeScaling::Llama3(s) => s.apply(&mut f),
        }
        f
    }
}

/// NeMo's rotary frequencies `1 / base^(2i / dim)` for the `n = dim / 2` pairs, computed
/// in float32 as torch computes them (so the values are the same to the bit).
pub fn rope_inv_freq(base: f64, n: u64) -> Vec<f32> {
    let dim = (2 * n) as f32;
    (0..n)
        .map(|i| 1.0f32 / (base as f32).powf((2 * i) as f32 / dim))
        .collect()
}
