//! Same seed and config give the same bits: run to run, and on 1 or 2 threads.

use svp_integration_tests::{embedded_subset, small_config};
use svp_train::{Method, fit};

fn train_bits(method: Method, threads: usize, mutate: impl Fn(&mut svp_train::Config)) -> Vec<u32> {
    let mut config = small_config(method, 1);
    mutate(&mut config);
    let data = embedded_subset(640);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let outcome = pool.install(|| fit(&config, &data, &mut ()));
    assert!(outcome.diverged.is_none());
    outcome.model.params().iter().map(|v| v.to_bits()).collect()
}

fn assert_same(a: &[u32], b: &[u32], what: &str) {
    let differing = a.iter().zip(b).filter(|(x, y)| x != y).count();
    assert_eq!(differing, 0, "{what}: {differing} of {} weights differ", a.len());
}

#[test]
fn svp_is_bit_identical_run_to_run_and_across_thread_counts() {
    let one = train_bits(Method::Svp, 1, |_| {});
    let two = train_bits(Method::Svp, 2, |_| {});
    let again = train_bits(Method::Svp, 2, |_| {});
    assert_same(&two, &again, "SVP run to run");
    assert_same(&one, &two, "SVP 1 vs 2 threads");
}

#[test]
fn bp_is_bit_identical_run_to_run_and_across_thread_counts() {
    let one = train_bits(Method::Bp, 1, |_| {});
    let two = train_bits(Method::Bp, 2, |_| {});
    let again = train_bits(Method::Bp, 2, |_| {});
    assert_same(&two, &again, "BP run to run");
    assert_same(&one, &two, "BP 1 vs 2 threads");
}

#[test]
fn every_svp_option_stays_deterministic() {
    // Dropout on R and on activations, label concatenation, centring, a wide
    // projection that needs several tiles, and wider layers that take the
    // parallel paths of the row loops.
    let mutate = |c: &mut svp_train::Config| {
        c.model.hidden = vec![512, 300];
        c.model.dropout = 0.1;
        c.svp.projection_dim = Some(64);
        c.svp.projection_dropout = 0.2;
        c.svp.label_concat = true;
        c.svp.mean_center = true;
        c.svp.tile_bytes = 8 * 1024;
    };
    let one = train_bits(Method::Svp, 1, mutate);
    let two = train_bits(Method::Svp, 2, mutate);
    assert_same(&one, &two, "SVP with every option, 1 vs 2 threads");
}

#[test]
fn the_seed_matters() {
    let a = train_bits(Method::Svp, 2, |_| {});
    let b = train_bits(Method::Svp, 2, |c| c.train.seed = 8);
    assert!(a.iter().zip(&b).filter(|(x, y)| x != y).count() > a.len() / 2);
}
