//! Training: data, the optimizer, learning-rate schedules, gradient clipping, the token loss and
//! the loop, each written once here because candle-nn has no clipping, no schedule, no
//! checkpointable AdamW and no ignore index in its cross-entropy.

pub mod data;
pub mod loss;
mod malloc;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use loss::{masked_cross_entropy, IGNORE_INDEX};
pub use malloc::reuse_freed_memory;
pub use optim::{clip_grad_norm, grad_norms, AdamW, AdamWConfig};
pub use schedule::LrSchedule;
pub use trainer::{latest_checkpoint, CausalLm, StepLog, TrainConfig, Trainer};
