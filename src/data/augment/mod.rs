//! Training-time augmentation with timm's semantics, as BEiT fine-tuning
//! uses it (`timm.data.create_transform(is_training=True)` and
//! `timm.data.Mixup`).
//!
//! Every random decision draws from a caller-supplied [`rand::Rng`], so the
//! output is a pure function of the input and the generator state: the
//! loader seeds one generator per sample and the training loop one per
//! step. The random streams differ from Python's, so outputs match timm in
//! distribution; the deterministic parts (each op at a given magnitude and
//! sign, crop-and-resize of a given box) match Pillow / torchvision bit for
//! bit.

mod crop;
mod erasing;
mod mixup;
mod pillow;
mod rand_augment;
mod transform;
mod two_view;

pub use crop::{CropBox, RandomResizedCrop, hflip};
pub use erasing::RandomErasing;
pub use mixup::{Mixup, smooth_one_hot};
pub use pillow::Resample;
pub use rand_augment::{Op, RAND_INCREASING_OPS, RAND_OPS, RandAugment};
pub use transform::{TrainTransform, timm_img_mean};
pub use two_view::{ColorJitter, TwoViewTransform};
