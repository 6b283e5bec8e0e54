//! Memory properties of a training step, measured by a counting allocator.

use std::sync::Mutex;
use svp_alloc::CountingAlloc;
use svp_integration_tests::small_config;
use svp_train::config::{ConvItem, PoolMarker, VitConfig};
use svp_train::{BpTrainer, Config, InferenceWorkspace, Method, Network, ProjectionHeads, SvpTrainer, Trainer};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

/// The allocator's counters are global: tests that read them take turns.
static COUNTERS: Mutex<()> = Mutex::new(());

/// One batch of `rows` embedded training samples.
fn batch(rows: usize) -> (Vec<f32>, Vec<u32>) {
    let data = svp_data::DataSplit::embedded();
    let norm = svp_data::Normalization::fit(&data.train);
    let mut batcher = svp_data::Batcher::new(data.train.len(), rows, norm);
    batcher.start_epoch(1, 0, true);
    let mut x = vec![0.0; rows * data.features()];
    let mut y = vec![0; rows];
    batcher.gather(&data.train, 0, &mut x, &mut y);
    (x, y)
}

/// Heap allocations made by three calls of `f` after a first one, on a
/// thread of the rayon pool as in `svp_train::fit`.
fn allocations_after_first(mut f: impl FnMut() + Send) -> usize {
    rayon::scope(|_| {
        f();
        ALLOC.reset_peaks();
        for _ in 0..3 {
            f();
        }
        ALLOC.stats().allocations
    })
}

/// The networks and rules the allocation test covers, each with a name.
fn allocation_cases() -> Vec<(&'static str, Config)> {
    let mlp = |edit: fn(&mut Config)| {
        let mut c = small_config(Method::Svp, 1);
        edit(&mut c);
        c
    };
    let mut cnn = small_config(Method::Svp, 1);
    cnn.model.conv = vec![ConvItem::Channels(4), ConvItem::Pool(PoolMarker::M), ConvItem::Channels(8)];
    cnn.model.hidden = vec![];
    let mut vit = small_config(Method::Svp, 1);
    vit.model.vit =
        Some(VitConfig { patch: 7, dim: 16, depth: 2, heads: 2, mlp: 32, readout: svp_nn::vit::TokenReadout::Cls });
    vit.model.hidden = vec![];
    vec![
        ("MLP, SVP.md defaults", mlp(|_| {})),
        (
            "MLP, d' = 256 in tiles",
            mlp(|c| {
                c.svp.projection_dim = Some(256);
                c.svp.tile_bytes = 16 * 1024;
            }),
        ),
        ("MLP, label concatenation", mlp(|c| c.svp.label_concat = true)),
        (
            "MLP, SVP+ units of 2, head in the last unit",
            mlp(|c| {
                c.model.hidden = vec![256, 256, 256];
                c.svp.layers_per_unit = 2;
                c.svp.head_joins_last_unit = true;
            }),
        ),
        ("MLP, dropout on R", mlp(|c| c.svp.projection_dropout = 0.1)),
        ("CNN, SVP", cnn.clone()),
        ("CNN, SVP+ units of 2", {
            let mut c = cnn;
            c.svp.layers_per_unit = 2;
            c
        }),
        ("ViT, SVP+ units of 2", {
            let mut c = vit;
            c.svp.layers_per_unit = 2;
            c
        }),
    ]
}

/// After its first step, a training step allocates nothing, under SVP (every
/// option that changes what a step computes) and under backprop.
#[test]
fn training_steps_allocate_nothing_after_the_first() {
    let _turn = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let data = svp_data::DataSplit::embedded();
    let (x, y) = batch(64);
    let mut failures = Vec::new();
    for (name, config) in allocation_cases() {
        for method in [Method::Svp, Method::Bp] {
            let mut model = Network::try_for_images(data.train.image_shape, data.classes, &config.model, 1)
                .expect("memory for the model");
            let mut trainer: Box<dyn Trainer + Send> = match method {
                Method::Svp => Box::new(SvpTrainer::new(&model, &config)),
                Method::Bp => Box::new(BpTrainer::new(&model, &config)),
            };
            let allocations = allocations_after_first(|| {
                trainer.step(&mut model, &x, &y, 1.0).expect("finite loss");
            });
            eprintln!("{name}, {method:?}: {allocations} allocations in 3 steps");
            if allocations != 0 {
                failures.push(format!("{name} under {method:?}: {allocations} allocations in 3 steps"));
            }
        }
    }
    assert!(failures.is_empty(), "steps allocated: {failures:?}");
}

/// After its first batch, inference allocates nothing, with and without the
/// early exits of the projection heads.
#[test]
fn inference_allocates_nothing_after_the_first_batch() {
    let _turn = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let data = svp_data::DataSplit::embedded();
    let (x, _) = batch(64);
    for (name, config) in allocation_cases() {
        let model = Network::try_for_images(data.train.image_shape, data.classes, &config.model, 1)
            .expect("memory for the model");
        let heads = ProjectionHeads::from_config(&config, data.classes);
        let mut ws = InferenceWorkspace::default();
        for exits in [None, Some(&heads)] {
            let allocations = allocations_after_first(|| {
                std::hint::black_box(model.predict(&x, 64, &mut ws, exits));
            });
            assert_eq!(allocations, 0, "{name}, exits {}: inference allocated", exits.is_some());
        }
    }
}

/// With `d' x d_l` above the tile size, no step ever holds `R_l` whole: the
/// largest allocation during training stays below `d' x d_l x 4` bytes, and
/// the trainer's tile buffer holds `tile_bytes`.
#[test]
fn projection_is_never_materialized_whole() {
    let _turn = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
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
