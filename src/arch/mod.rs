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
    /// A rule the runtime does not implement (named as in `config.json`).
    Other(String),
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

    /// The linear position-scaling factor (1 when none).
    pub fn rope_factor(&self) -> f64 {
        match self.rope_scaling {
            RopeScaling::None | RopeScaling::Other(_) => 1.0,
            RopeScaling::Linear(f) => f,
        }
    }

    /// The rotary frequencies of one head.
    pub fn inv_freq(&self) -> Vec<f32> {
        rope_inv_freq(self.rope_theta, self.head_dim / 2)
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
