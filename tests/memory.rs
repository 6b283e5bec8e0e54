//! Memory properties of a training step, measured by a counting allocator.

use std::sync::Mutex;
use svp_alloc::CountingAlloc;
use svp_integration_tests::small_config;
use svp_train::config::{ConvItem, PoolMarker, VitConfig};
use svp_train::{BpTrainer, Config, InferenceWorkspace, LayerScratch, Method, Network, SvpTrainer, Trainer};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

/// The allocator's counters are global: tests that read them take turns.
static COUNTERS: Mutex<()> = Mutex::new(());

/// One batch of `rows` embedded training samples.
fn batch(rows: usize) -> (Vec<f32>, Vec<u32>) {
    let data = svp_data::DataSplit::embedded();
    let norm = svp_train::Normalization::of_pixels(&data.train.images);
    let mut batcher = svp_data::Batcher::new(data.train.len(), rows, norm.table());
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
    vit.model.vit = Some(VitConfig {
        patch: 7,
        dim: 16,
        depth: 2,
        heads: 2,
        mlp: 32,
        readout: svp_nn::vit::TokenReadout::Cls,
        norm_eps: svp_nn::layer_norm::LAYER_NORM_EPS,
    });
    vit.model.hidden = vec![];
    vec![
        ("MLP, default SVP options", mlp(|_| {})),
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

/// The device trainer's step allocates nothing after its first either (on
/// the host backend, whose operations reuse their buffers as the GPU's do):
/// SVP, SVP+ units and BP.
#[test]
fn device_trainer_steps_allocate_nothing_after_the_first() {
    use svp_train::device::{DeviceTrainer, HostBackend};
    let _turn = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let (x, y) = batch(64);
    let mut units = small_config(Method::Svp, 1);
    units.svp.layers_per_unit = 2;
    for (name, config) in [("SVP", small_config(Method::Svp, 1)), ("SVP+", units), ("BP", small_config(Method::Bp, 1))]
    {
        let mut model = Network::try_for_images((28, 28), 10, &config.model, 1).expect("memory for the model");
        let mut trainer = DeviceTrainer::try_new(HostBackend::new(), &model, &config).expect("host backend");
        let allocations = allocations_after_first(|| {
            trainer.step(&mut model, &x, &y, 1.0).expect("finite loss");
        });
        assert_eq!(allocations, 0, "{name}: the device trainer's step allocated");
    }
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
        let heads = config.projection_heads(data.classes);
        let mut ws = InferenceWorkspace::default();
        for exits in [None, Some(&heads)] {
            let allocations = allocations_after_first(|| {
                std::hint::black_box(model.predict(&x, 64, &mut ws, exits));
            });
            assert_eq!(allocations, 0, "{name}, exits {}: inference allocated", exits.is_some());
        }
    }
}

/// With `d' x d_l` above the tile size, no `R_l` is ever held whole, in a
/// step or across steps: the projections are regenerated tile by tile.
///
/// Three bounds, each of which a trainer keeping the `R_l` (2.8 MiB here:
/// 256 x (784 + 1024 + 1024) floats) would break:
/// * the largest allocation of a step is below the smallest whole `R_l`
///   (`R_0`, 256 x 784 floats, 784 KiB);
/// * the heap's peak over setup and three steps, above the weights, is the
///   optimizer state, the workspace the trainer reports, and the GEMM's
///   packing buffers, with nothing else beside them;
/// * that workspace grows with `d'` only by buffers of one row per sample
///   (projections, readouts and their gradients), not by `d' x d_l`.
#[test]
fn projection_is_never_materialized_whole() {
    let _turn = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let (rows, d_prime) = (128, 256);
    let config_for = |d_prime: usize| {
        let mut config = small_config(Method::Svp, 1);
        config.model.hidden = vec![1024, 1024];
        config.train.batch_size = rows;
        config.svp.projection_dim = Some(d_prime);
        config.svp.tile_bytes = 64 * 1024;
        config
    };
    let config = config_for(d_prime);
    let smallest_r = d_prime * 784 * 4;
    let (x, y) = batch(rows);
    let mut model = Network::new(784, 10, &config.model, 1);

    rayon::scope(|_| {
        let live_before = ALLOC.stats().live;
        ALLOC.reset_peaks();
        let mut trainer = SvpTrainer::new(&model, &config);
        trainer.step(&mut model, &x, &y, 1.0).unwrap();
        let first = ALLOC.stats();
        ALLOC.reset_peaks();
        for _ in 0..3 {
            trainer.step(&mut model, &x, &y, 1.0).unwrap();
        }
        let during = ALLOC.stats();
        let held = first.peak.max(during.peak) - live_before;
        let accounted = trainer.optimizer_bytes() + trainer.workspace_bytes() + svp_tensor::workspace_bytes_reserved();
        eprintln!(
            "largest allocation in a step {} B (R_0 {smallest_r} B); peak above the weights {held} B, \
             optimizer + workspace + GEMM buffers {accounted} B",
            during.largest
        );
        assert!(during.largest < smallest_r, "a step allocated {} bytes, R_0 is {smallest_r}", during.largest);
        assert!(held <= accounted + 64 * 1024, "{held} bytes held, {accounted} accounted for");
    });

    let workspace = |d_prime: usize| SvpTrainer::new(&model, &config_for(d_prime)).workspace_bytes();
    let growth = workspace(d_prime) - workspace(16);
    let row_buffers = 8 * rows * (d_prime - 16) * 4;
    eprintln!("workspace growth from d' = 16 to {d_prime}: {growth} B (8 row buffers: {row_buffers} B)");
    assert!(growth <= row_buffers, "the workspace grew by {growth} bytes with d'");
}

/// Backprop keeps per layer only what that layer's backward reads (its
/// output and BatchNorm's normalized values and statistics): a conv block's
/// backward scratch (gradients inside the block, im2col or Winograd
/// columns) is one buffer shared by every block, so one more block adds
/// exactly its kept state. With scratch per block it would add three
/// planes, the columns and their gradient.
#[test]
fn backprop_adds_per_block_only_what_its_backward_reads() {
    // Allocates: not while another test counts.
    let _turn = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let data = svp_data::DataSplit::embedded();
    let rows = 16;
    let channels = 8;
    let workspace = |blocks: usize| {
        let mut config = small_config(Method::Bp, 1);
        config.model.conv = vec![ConvItem::Channels(channels); blocks];
        config.model.hidden = vec![];
        config.train.batch_size = rows;
        let model = Network::try_for_images(data.train.image_shape, data.classes, &config.model, 1)
            .expect("memory for the model");
        BpTrainer::new(&model, &config).workspace_bytes()
    };
    let plane = rows * channels * 28 * 28;
    // The block's output and normalized values, and a mean and 1/std per channel.
    let kept = 4 * (2 * plane + 2 * channels);
    for blocks in [2, 3] {
        let growth = workspace(blocks + 1) - workspace(blocks);
        assert_eq!(growth, kept, "block {} added {growth} bytes; it keeps {kept}", blocks + 1);
    }
}

/// Inference's layer scratch holds the forward's buffers alone: for conv
/// blocks without pooling, training's adds the conv output's gradient (one
/// plane per sample) and the columns' gradient (as large as the columns,
/// which are all that inference holds).
#[test]
fn inference_holds_no_backward_scratch() {
    // Allocates: not while another test counts.
    let _turn = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let data = svp_data::DataSplit::embedded();
    let (rows, channels) = (16, 8);
    let mut config = small_config(Method::Bp, 1);
    config.model.conv = vec![ConvItem::Channels(channels); 3];
    config.model.hidden = vec![];
    let model = Network::try_for_images(data.train.image_shape, data.classes, &config.model, 1).unwrap();
    let training = LayerScratch::try_for(model.all_layers(), rows).unwrap().bytes();
    let inference = LayerScratch::try_for_inference(model.all_layers(), rows).unwrap().bytes();
    let plane = rows * channels * 28 * 28;
    assert!(inference > 0, "the forward needs its columns");
    assert_eq!(training, 2 * inference + 4 * plane, "training {training} B, inference {inference} B");
}
