//! Load a model file and predict: the inference path alone (no optimizer,
//! no training workspace), one reused buffer for every layer.
//!
//!     cargo run --release -p svp-model --example load_and_predict -- mlp.svpm

use svp_model::{InferenceModel, InferenceWorkspace};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "mlp.svpm".into());
    let model = InferenceModel::load(path.as_ref())?;
    let meta = model.meta();
    // Ten test images, preprocessed as the model was trained: (pixel/255 - mean) / std.
    let test = svp_data::DataSplit::embedded().test;
    let rows = 10;
    let x: Vec<f32> = test.images[..rows * test.features()]
        .iter()
        .map(|&p| (p as f32 / 255.0 - meta.norm.mean) / meta.norm.std)
        .collect();
    let mut workspace = InferenceWorkspace::default();
    let logits = model.predict(&x, rows, None, &mut workspace);
    for (i, row) in logits.chunks(meta.classes()).enumerate() {
        let class = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).expect("classes");
        println!("image {i}: {} (label {})", meta.class_names[class], meta.class_names[test.labels[i] as usize]);
    }
    Ok(())
}
