//! Any bytes given to the model-file decoder: an error or a model, never a
//! panic; a decoded model must also predict without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use svp_model::{InferenceModel, InferenceWorkspace, ModelFile};

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = ModelFile::from_bytes(data, Path::new("fuzz")) {
        // One sample as the model reads it: an image of the file's shape (a
        // conv or ViT file's first dense layer reads features, not pixels).
        let (h, w) = file.meta.image_shape;
        let inputs = h as usize * w as usize;
        if inputs <= 1 << 16 {
            let model = InferenceModel::new(file);
            let x = vec![0.25f32; inputs];
            let mut ws = InferenceWorkspace::default();
            let _ = model.predict(&x, 1, None, &mut ws);
        }
    }
});
