"""Training interrupted and resumed with `BackupAndRestore` ends where an
uninterrupted run ends: same weights, optimizer state and MoE state.

MoE layers carry state beyond their weights: the routing-statistics sums
(and, for routers that balance with a bias, that bias) and the seed
generators of router noise and expert dropout. All of it must survive a
backup and restore, or a resumed run silently drifts from the one it
continues. The comparison covers every variable of the model and of the
optimizer, so state added by new layers is covered as soon as a case with
that layer is in `RESUME_CASES`.
"""

import os

import keras
import numpy as np
from absl.testing import parameterized
from keras.src import testing

from keras_moe import ExpertFFN
from keras_moe import TopKRouter
from tests.reliability import helpers
from tests.reliability.cases import MOE_CASES

# Router noise and expert dropout (seed states) and capacity drops (routing
# statistics); one MoE layer keeps the three compiled training runs cheap.
# Add the case of any layer with more state (e.g. a router balanced by a
# bias it updates itself) here.
RESUME_CASES = [case for case in MOE_CASES if case.stochastic]
EPOCHS = 4
INTERRUPTED_AT = 2  # the epoch that does not start


class _Interrupt(keras.callbacks.Callback):
    """Stands for a preemption: raises when epoch `INTERRUPTED_AT` begins."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == INTERRUPTED_AT:
            raise RuntimeError("preempted")


def _fresh_model():
    """The same model, as a restarted job would build it."""
    keras.utils.clear_session()
    keras.utils.set_random_seed(3)
    model = helpers.zoo_model(cases=RESUME_CASES, seed=7)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def _state(model):
    """{position/name: value} of every model and optimizer variable."""
    return {
        f"{index}/{variable.name}": np.asarray(keras.ops.convert_to_numpy(variable))
        for index, variable in enumerate(model.variables + model.optimizer.variables)
    }


class ResumeTest(testing.TestCase):
    def test_interrupted_and_resumed_run_matches_uninterrupted_run(self):
        tokens, targets = helpers.zoo_data(num_samples=8, seed=4)
        fit_kwargs = dict(
            # No shuffling: BackupAndRestore restores the model, not the
            # data pipeline's random state.
            batch_size=4, epochs=EPOCHS, verbose=0, shuffle=False,
        )
        model = _fresh_model()
        model.fit(tokens, targets, **fit_kwargs)
        expected = _state(model)

        backup_dir = os.path.join(self.get_temp_dir(), "backup")
        model = _fresh_model()
        with self.assertRaisesRegex(RuntimeError, "preempted"):
            model.fit(
                tokens, targets,
                callbacks=[keras.callbacks.BackupAndRestore(backup_dir), _Interrupt()],
                **fit_kwargs,
            )
        model = _fresh_model()
        history = model.fit(
            tokens, targets,
            callbacks=[keras.callbacks.BackupAndRestore(backup_dir)],
            **fit_kwargs,
        )
        # The restarted job trained only the epochs that were missing...
        self.assertLen(history.history["loss"], EPOCHS - INTERRUPTED_AT)
        # ...and ends exactly where the uninterrupted one did.
        resumed = _state(model)
        self.assertEqual(sorted(resumed), sorted(expected))
        for key, value in expected.items():
            np.testing.assert_array_equal(resumed[key], value, err_msg=key)
        # The routing statistics cover all epochs, restored ones included.
        for layer in helpers.moe_layers_of(model):
            self.assertEqual(layer.routing_statistics()["steps"], 2.0 * EPOCHS)


class SeedStateSavingTest(testing.TestCase):
    @parameterized.named_parameters(
        ("router", lambda: TopKRouter(4, 2, jitter_noise=0.1, logit_noise_std=1.0, seed=5), (3, 6)),
        ("expert_dropout", lambda: ExpertFFN(4, 8, dropout=0.5, seed=5), (4, 3, 6)),
    )
    def test_restored_layer_continues_its_random_stream(self, make, shape):
        x = np.random.default_rng(0).normal(size=shape).astype("float32")
        layer = make()
        layer(x, training=True)  # advance the stream
        path = os.path.join(self.get_temp_dir(), "layer.weights.h5")
        model = keras.Sequential([keras.Input(shape[1:]), layer])
        model.save_weights(path)
        expected = keras.tree.flatten(layer(x, training=True))
        # A fresh layer, same seed, with the saved state: the next draw is
        # the original's next draw, not its first one.
        restored = make()
        keras.Sequential([keras.Input(shape[1:]), restored]).load_weights(path)
        actual = keras.tree.flatten(restored(x, training=True))
        for a, b in zip(actual, expected):
            self.assertAllClose(a, b)
        first_draw = keras.tree.flatten(make()(x, training=True))
        self.assertNotAllClose(first_draw[-1], expected[-1])

    def test_files_without_seed_states_still_load(self):
        router = TopKRouter(4, 2, seed=5)
        router.build((None, 6))
        store = {}
        router.save_own_variables(store)
        self.assertEqual(sorted(store), ["0", "seed_generator_state_0"])
        del store["seed_generator_state_0"]
        restored = TopKRouter(4, 2, seed=5)
        restored.build((None, 6))
        restored.load_own_variables(store)
        self.assertAllClose(restored.kernel, router.kernel)
        with self.assertRaisesRegex(ValueError, "expected 1 variables"):
            restored.load_own_variables({})
