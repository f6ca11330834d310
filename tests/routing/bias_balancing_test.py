import numpy as np
from keras.src import testing

from keras_moe.routing import bias_balancing
from tests.utils import to_numpy


class BiasBalancingTest(testing.TestCase):
    def test_bias_changes_the_selection_not_the_weights(self):
        scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.4]], "float32")
        bias = np.array([-0.2, 0.0, 0.0], "float32")
        weights, index = bias_balancing.biased_top_k(scores, bias, 1)
        # Token 0: biased [0.7, 0.8, 0.1] picks e1, weighted by its score
        # 0.8. Token 1: biased [0.0, 0.3, 0.4] picks e2.
        self.assertEqual(to_numpy(index).tolist(), [[1], [2]])
        self.assertAllClose(weights, [[0.8], [0.4]])
        weights, index = bias_balancing.biased_top_k(scores, bias, 2)
        self.assertEqual(to_numpy(index).tolist(), [[1, 0], [2, 1]])
        self.assertAllClose(weights, [[0.8, 0.9], [0.4, 0.3]])

    def test_update_formula(self):
        # Counts [6, 1, 1, 0], mean 2: e0 is overloaded (bias down), the
        # others underloaded (bias up).
        bias = np.array([0.5, 0.0, -0.1, 0.0], "float32")
        new = bias_balancing.update_expert_bias(bias, np.array([6.0, 1.0, 1.0, 0.0]), 0.01)
        self.assertAllClose(new, [0.49, 0.01, -0.09, 0.01])
        # Exactly balanced (or no tokens at all): no change.
        self.assertAllClose(
            bias_balancing.update_expert_bias(bias, np.full(4, 3.0), 0.01), bias
        )
        self.assertAllClose(
            bias_balancing.update_expert_bias(bias, np.zeros(4), 0.01), bias
        )
