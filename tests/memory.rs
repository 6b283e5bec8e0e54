//! Memory properties of a training step, measured by a counting allocator.

use svp_alloc::CountingAlloc;
use svp_integration_tests::small_config;
use svp_train::{Method, Network, SvpTrainer, Trainer};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

/// With `d' x d_l` above the tile size, no step ever holds `R_l` whole: the
/// largest allocation during training stays below `d' x d_l x 4` bytes, and
/// the trainer's tile buffer holds `tile_bytes`.
#[test]
fn projection_is_never_materialized_whole() {
    let mut config = small_config(Method::Svp, 1);
    config.model.hidden = vec![1024, 1024];
    config.train.batch_size = 128;
    config.svp.projection_dim = Some(256);
    config.svp.tile_bytes = 64 * 1024;
    let whole_r = 256 * 1024 * 4;
    let data = svp_data::DataSplit::embedded();
    let norm = svp_data::Normalization::fit(&data.train);
    let mut batcher = svp_data::Batcher::new(data.train.len(), 128, norm);
    batcher.start_epoch(1, 0, true);
    let mut x = vec![0.0; 128 * 784];
    let mut y = vec![0; 128];
    batcher.gather(&data.train, 0, &mut x, &mut y);

    let mut model = Network::new(784, 10, &config.model, 1);
    ALLOC.reset_peaks();
    let mut trainer = SvpTrainer::new(&model, &config);
    let setup_largest = ALLOC.stats().largest;
    ALLOC.reset_peaks();
    for _ in 0..3 {
        trainer.step(&mut model, &x, &y, 1.0).unwrap();
    }
    let during = ALLOC.stats().largest;
    eprintln!("largest allocation: trainer setup {setup_largest} B, during steps {during} B, whole R {whole_r} B");
    assert!(during < whole_r, "a step allocated {during} bytes, R_l is {whole_r}");
    // The trainer's buffers: the largest is the gradient of a 1024 x 1024 layer,
    // not R (which would be 1 MiB here, and 2.8 MiB at d' = 700).
    assert!(setup_largest <= (1024 * 1024 + 3 * 1024) * 4, "setup allocated {setup_largest}");
}
