//! Training-time augmentation (timm semantics).
