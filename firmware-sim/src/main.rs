//! `cargo run -p firmware-sim -- --profile NAME [--model FILE]`: the on-device
//! fine-tuning scenario on a simulated device.
//!
//! A model pre-trained on clean Fashion-MNIST meets a camera that sees the
//! world differently (`camera.rs`). The device measures its accuracy on shifted
//! test images, fine-tunes on a stream of shifted samples inside its RAM budget
//! (enforced by the allocator), checkpointing to its simulated flash, and
//! measures again. The same fine-tuning with backpropagation is tried under the
//! same budget.

#![forbid(unsafe_code)]

use clap::{Parser, ValueEnum};
use firmware_sim::flash::Flash;
use firmware_sim::store::CheckpointStore;
use firmware_sim::{FineTuning, Profile, camera, fine_tune_config, profiles_dir};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use svp_alloc::CountingAlloc;
use svp_data::{DataSplit, Dataset};
use svp_model::ModelFile;
use svp_train::CheckpointRef;
use svp_train::{FitObserver, FitOptions, FitStateRef, InferenceWorkspace, Method, Network, evaluate, try_fit_with};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

/// Heap kept free beyond a trainer's own buffers, for what a step and an
/// evaluation allocate on the way (the GEMM's packing buffers, up to 0.6 MiB;
/// the evaluation workspace; a checkpoint's encoding, about the size of weights
/// and optimizer state): checked before the first step.
const HEADROOM: usize = 2 << 20;

/// The simulated device's fine-tuning scenario: a model file fine-tuned on a
/// shifted camera stream under a profile's RAM budget, checkpointed to its
/// flash, with SVP and with backpropagation.
#[derive(Debug, Parser)]
#[command(name = "firmware-sim", version, about, long_about = None)]
struct Cli {
    /// Device profile: a file of profiles/ (board-32m, ...).
    #[arg(long)]
    profile: String,
    /// The model file fine-tuned on the device.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/device-mlp.svpm"))]
    model: PathBuf,
    /// Camera samples to fine-tune on.
    #[arg(long, default_value_t = 6000, value_parser = positive)]
    samples: usize,
    /// Epochs of fine-tuning.
    #[arg(long, default_value_t = 30, value_parser = positive)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 512, value_parser = positive)]
    batch: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Steps between checkpoints to the flash.
    #[arg(long, default_value_t = 10)]
    checkpoint_every: u64,
    /// Where the simulated chip is created (a path that does not exist; it
    /// is removed after the run). Default: a file in the temp folder.
    #[arg(long)]
    flash: Option<PathBuf>,
    /// Which training rule to run.
    #[arg(long, value_enum, default_value_t = MethodChoice::Both)]
    method: MethodChoice,
    /// Precision of Adam's moments.
    #[arg(long, value_enum, default_value_t = MomentsChoice::F32)]
    moments: MomentsChoice,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MethodChoice {
    Svp,
    Bp,
    Both,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MomentsChoice {
    F32,
    Bf16,
}

fn positive(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{v:?} is not a whole number")),
    }
}

/// What a run takes, from the command line.
struct Args {
    profile: String,
    model: PathBuf,
    samples: usize,
    epochs: usize,
    batch: usize,
    lr: f32,
    checkpoint_every: u64,
    flash: PathBuf,
    methods: Vec<Method>,
    moments: svp_optim::MomentDtype,
}

/// Where the simulated chip lives unless `--flash` says otherwise.
fn default_flash() -> PathBuf {
    std::env::temp_dir().join(format!("svp-device-flash-{}.bin", std::process::id()))
}

fn parse() -> Result<Args, String> {
    let cli = Cli::parse();
    let a = Args {
        profile: cli.profile,
        model: cli.model,
        samples: cli.samples,
        epochs: cli.epochs,
        batch: cli.batch,
        lr: cli.lr,
        checkpoint_every: cli.checkpoint_every,
        flash: cli.flash.unwrap_or_else(default_flash),
        methods: match cli.method {
            MethodChoice::Svp => vec![Method::Svp],
            MethodChoice::Bp => vec![Method::Bp],
            MethodChoice::Both => vec![Method::Svp, Method::Bp],
        },
        moments: match cli.moments {
            MomentsChoice::F32 => svp_optim::MomentDtype::F32,
            MomentsChoice::Bf16 => svp_optim::MomentDtype::Bf16,
        },
    };
    // The chip is created fresh for each method's run and removed after it:
    // a file already at a path the user gave is somebody's data, never
    // overwritten. At the default path (this process's own name in the temp
    // folder) one can only be a chip left by a killed run whose process id
    // this one reuses.
    if a.flash == default_flash() {
        let _ = std::fs::remove_file(&a.flash);
    } else if a.flash.exists() {
        return Err(format!(
            "--flash {}: the file exists; the simulated chip is created fresh there and removed after the run, \
             so give a path that does not exist",
            a.flash.display()
        ));
    }
    Ok(a)
}

/// Checkpoints go to the device's flash.
struct Device {
    store: CheckpointStore,
    saved: u64,
    bytes: usize,
}

impl FitObserver for Device {
    fn on_checkpoint(&mut self, state: &FitStateRef<'_>) -> Result<(), String> {
        // Streamed from the trainer's own buffers to the flash: no copy of the
        // weights or optimizer state is ever made in RAM.
        let c = CheckpointRef { config_json: "", data_origin: "device camera stream", train_len: 0, state: *state };
        self.bytes = c.payload_len_and_checksum().0 as usize;
        self.store.save_streamed(|w| c.write_payload(w)).map_err(|e| e.to_string())?;
        self.saved += 1;
        Ok(())
    }
}

/// The simulated chip's backing file for one method's run: created fresh,
/// removed when the run ends, however it ends (an error included).
struct ChipFile<'a>(&'a std::path::Path);

impl Drop for ChipFile<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

fn mib(b: usize) -> f64 {
    b as f64 / 1048576.0
}

fn accuracy(model: &Network, data: &Dataset, norm: svp_train::Normalization) -> f64 {
    evaluate(model, data, norm, 256, None, &mut InferenceWorkspace::default()).accuracy
}

fn run() -> Result<bool, String> {
    let args = parse()?;
    let profile = Profile::load(&profiles_dir(), &args.profile).map_err(|e| e.to_string())?;
    rayon::ThreadPoolBuilder::new().num_threads(profile.cores).build_global().map_err(|e| e.to_string())?;
    let file = ModelFile::load(&args.model).map_err(|e| e.to_string())?;
    let data = DataSplit::embedded();
    let shifted_stream = camera::shift_dataset(&data.train, 1, args.samples);
    let shifted_test = camera::shift_dataset(&data.test, 2, data.test.len());
    if file.meta.front.is_some() {
        return Err(format!(
            "{}: the device simulator fine-tunes MLPs; this model has conv blocks or a ViT",
            args.model.display()
        ));
    }
    let norm = file.meta.norm;
    let base = file.to_network();
    println!(
        "device {}: {} MiB RAM, {} MiB flash, {} core(s); model {} ({} layers, {:.1} MiB of weights, {} file)",
        profile.name,
        profile.ram_mib,
        profile.flash_mib,
        profile.cores,
        args.model.display(),
        file.meta.layers.len(),
        mib(base.param_bytes()),
        file.meta.weight_dtype().name()
    );
    let clean_acc = accuracy(&base, &data.test, norm);
    let before = accuracy(&base, &shifted_test, norm);
    println!(
        "camera shift (rotate {}°, contrast {}, +{} brightness, noise σ {}): test accuracy {:.2}% clean -> {:.2}% shifted",
        camera::ROTATION_DEG,
        camera::CONTRAST,
        camera::BRIGHTNESS,
        camera::NOISE_STD,
        100.0 * clean_acc,
        100.0 * before
    );
    let initial = base.params().to_vec();
    drop(base);
    let meta = file.meta;
    drop(file.data);
    let split = DataSplit {
        train: shifted_stream,
        test: shifted_test,
        classes: data.classes,
        origin: "device camera stream".into(),
    };
    drop(data);

    let mut svp_ok = false;
    let mut bp_failed = false;
    for &method in &args.methods {
        let run = FineTuning {
            method,
            epochs: args.epochs,
            batch_size: args.batch,
            lr: args.lr,
            moments: args.moments,
            augment: Default::default(),
            train_from_layer: 1,
        };
        let config = fine_tune_config(&meta, run);
        config.validate_for_data(&split).map_err(|e| e.to_string())?;
        let _chip = ChipFile(&args.flash);
        let flash = Flash::open(&args.flash, profile.flash_mib << 20).map_err(|e| e.to_string())?;
        let (store, _) = CheckpointStore::open(flash).map_err(|e| e.to_string())?;
        let mut device = Device { store, saved: 0, bytes: 0 };
        // The device's RAM, from here on: what is already live counts against it.
        ALLOC.set_budget(profile.ram_bytes());
        ALLOC.reset_peaks();
        println!("{method}: {:.1} MiB of heap in use before training (data, model, runtime)", mib(ALLOC.stats().live));
        let start = Instant::now();
        let options = FitOptions {
            initial_params: Some(initial.clone()),
            norm: Some(norm),
            checkpoint_every: Some(args.checkpoint_every),
            headroom_bytes: HEADROOM,
            ..Default::default()
        };
        let result = try_fit_with(&config, &split, &mut device, options);
        let live_after = ALLOC.stats();
        ALLOC.set_budget(0);
        match result {
            Err(oom) => {
                println!(
                    "{method}: out of device memory: need {:.2} MiB more, budget {} MiB, at {} \
                     ({:.1} MiB in use when it failed, peak {:.1} MiB)",
                    mib(oom.bytes),
                    profile.ram_mib,
                    oom.what,
                    mib(live_after.live + oom.bytes),
                    mib(live_after.peak)
                );
                bp_failed |= method == Method::Bp;
            }
            Ok(outcome) => {
                if let Some(e) = outcome.interrupted.or(outcome.diverged.map(|d| d.to_string())) {
                    return Err(format!("{method}: {e}"));
                }
                let after = outcome.epochs.last().map_or(0.0, |r| r.test_acc);
                let steps: usize = outcome.epochs.len() * split.train.len().div_ceil(args.batch);
                println!(
                    "{method}: fine-tuned {} epochs over {} shifted samples ({steps} steps, batch {}) in {:.1} s: \
                     shifted test accuracy {:.2}% -> {:.2}% ({:+.2} points); peak heap {:.1} of {} MiB; \
                     {} checkpoints of {:.1} MiB to flash",
                    outcome.epochs.len(),
                    split.train.len(),
                    args.batch,
                    start.elapsed().as_secs_f64(),
                    100.0 * before,
                    100.0 * after,
                    100.0 * (after - before),
                    mib(live_after.peak),
                    profile.ram_mib,
                    device.saved,
                    mib(device.bytes)
                );
                svp_ok |= method == Method::Svp;
            }
        }
    }
    Ok(svp_ok || bp_failed || args.methods == [Method::Bp])
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
