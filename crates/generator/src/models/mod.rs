//! Model code kept in this crate (see each module for why).

pub(crate) mod attention;
pub(crate) mod gemma3;
pub(crate) mod layers;
pub(crate) mod llama;
pub(crate) mod qwen2;
