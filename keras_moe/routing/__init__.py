"""Pure routing functions: capacity, routing plan, dispatch and combine."""

from keras_moe.routing import bias_balancing
from keras_moe.routing import expert_choice
from keras_moe.routing.dispatch import PRIORITIES
from keras_moe.routing.dispatch import RoutingPlan
from keras_moe.routing.dispatch import buffer_rows
from keras_moe.routing.dispatch import combine
from keras_moe.routing.dispatch import compute_capacity
from keras_moe.routing.dispatch import compute_routing_plan
from keras_moe.routing.dispatch import dispatch
from keras_moe.routing.dispatch import is_static
from keras_moe.routing.dispatch import to_expert_major
from keras_moe.routing.dispatch import to_group_major
from keras_moe.routing.top_k import stable_top_k
from keras_moe.routing.dropless import DroplessLayout
from keras_moe.routing.dropless import dropless_combine
from keras_moe.routing.dropless import dropless_dispatch
from keras_moe.routing.dropless import dropless_layout
from keras_moe.routing.grouped_matmul import grouped_matmul
from keras_moe.routing.top_k import stable_argsort
