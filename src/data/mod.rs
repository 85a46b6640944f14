//! Image decoding and preprocessing.
//!
//! Everything here reproduces the Python reference pipeline bit for bit
//! where possible: Pillow's decoding and `convert("RGB")` ([`decode`]),
//! Pillow's fixed-point bicubic resampling ([`resize`]) and torchvision's
//! eval transforms ([`transforms`]).

pub mod decode;
pub mod resize;
pub mod transforms;

pub use decode::{MAX_PIXELS, RgbImage, decode_rgb, load_rgb};
pub use resize::resize_bicubic;
pub use transforms::{
    EvalTransform, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD, center_crop, load_batch, short_side_size,
};

pub mod augment;
pub mod dataset;
pub mod loader;
pub mod masking;
