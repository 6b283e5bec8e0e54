//! A run that diverges hands its observer only finite models: every epoch's
//! model is checked before it is evaluated and offered, for every rule and
//! layer kind, so what `svp train --out` saves always loads.

use svp_integration_tests::{embedded_subset, small_config};
use svp_train::config::{ConvItem, PoolMarker, VitConfig};
use svp_train::{Config, EpochModel, EpochReport, FitObserver, FitOptions, Method, TrainError, fit, fit_with};

/// Records the epochs it was offered, asserting each model finite.
#[derive(Default)]
struct FiniteModels(Vec<usize>);

impl FitObserver for FiniteModels {
    fn on_epoch(&mut self, report: &EpochReport, model: EpochModel<'_>) -> Result<(), String> {
        assert!(
            model.network.params().iter().all(|v| v.is_finite()),
            "epoch {} offered non-finite weights",
            report.epoch
        );
        assert_eq!(model.network.first_non_finite_layer(), None);
        self.0.push(report.epoch);
        Ok(())
    }
}

fn vision(method: Method, conv: bool) -> Config {
    let mut c = small_config(method, 3);
    c.model.hidden = vec![];
    if conv {
        c.model.conv = vec![ConvItem::Channels(4), ConvItem::Pool(PoolMarker::M), ConvItem::Channels(8)];
    } else {
        c.model.vit = Some(VitConfig {
            patch: 7,
            dim: 16,
            depth: 2,
            heads: 2,
            mlp: 32,
            readout: svp_nn::vit::TokenReadout::Cls,
            norm_eps: svp_nn::layer_norm::LAYER_NORM_EPS,
        });
    }
    c
}

/// A learning rate of 1e30 diverges at once under both rules, for MLPs,
/// conv networks and ViTs: the run reports it, and no model is offered.
#[test]
fn an_exploding_run_offers_no_model() {
    let data = embedded_subset(256);
    for method in [Method::Svp, Method::Bp] {
        for (name, mut config) in
            [("mlp", small_config(method, 3)), ("cnn", vision(method, true)), ("vit", vision(method, false))]
        {
            config.optimizer = svp_optim::Optimizer::adam(1e30);
            let mut seen = FiniteModels::default();
            let out = fit(&config, &data, &mut seen);
            let err = out.diverged.unwrap_or_else(|| panic!("{name} {method}: lr 1e30 should diverge"));
            assert!(seen.0.is_empty(), "{name} {method}: {err} after epochs {:?}", seen.0);
        }
    }
}

/// Backprop with SGD at lr 8 on a small MLP without normalization runs two
/// epochs, then its loss overflows in the third (step 26, 10 steps per
/// epoch): the observer got epochs 1 and 2, each finite. Training is
/// bit-exact, so the step is too.
#[test]
fn a_run_that_diverges_later_offered_every_epoch_before() {
    let data = embedded_subset(320);
    let mut config = small_config(Method::Bp, 8);
    config.model.hidden = vec![32];
    config.model.norm = svp_nn::Norm::None;
    config.train.batch_size = 32;
    config.optimizer = svp_optim::Optimizer::Sgd { lr: 8.0, momentum: 0.0, weight_decay: 0.0 };
    config.schedule = svp_train::Schedule::Constant { warmup_steps: 0 };
    let mut seen = FiniteModels::default();
    let out = fit(&config, &data, &mut seen);
    let err = out.diverged.expect("lr 8 diverges");
    assert!(matches!(err, TrainError::Diverged { step: 26, .. }), "{err}");
    assert_eq!(seen.0, [1, 2]);
}

/// Weights can go NaN while every loss stays finite (ReLU maps a NaN
/// pre-activation to 0, whose gradient is 0, so the NaN is never updated
/// away): the end of the epoch finds it and reports the layer, and the
/// model is not offered.
#[test]
fn non_finite_weights_under_finite_losses_end_the_run() {
    let data = embedded_subset(256);
    for method in [Method::Svp, Method::Bp] {
        let mut config = small_config(method, 2);
        config.model.norm = svp_nn::Norm::None;
        config.optimizer = svp_optim::Optimizer::Sgd { lr: 0.01, momentum: 0.0, weight_decay: 0.0 };
        let mut params = svp_train::Network::try_for_images((28, 28), 10, &config.model, config.train.seed)
            .expect("a small network")
            .params()
            .to_vec();
        params[5] = f32::NAN; // layer 1's first weight row
        let mut seen = FiniteModels::default();
        let options = FitOptions { initial_params: Some(params), ..Default::default() };
        let out = fit_with(&config, &data, &mut seen, options);
        let err = out.diverged.expect("a NaN weight is found");
        assert_eq!(err, TrainError::NonFiniteWeights { layer: 1, step: 4 }, "{method}");
        assert!(seen.0.is_empty());
    }
}
