//! Training: optimiser, schedules, loops, checkpoints, plots.

pub mod charts;
pub mod engine;
pub mod loss;
pub mod optim;
pub mod pretrain;
pub mod recipe;
pub mod tasks;
pub mod tokenizer;
