"""The merge plan, computed once from headers and the adapter, and what it is made of.

- `model`: the plan's data (MergePlan, ShardPlan, PlannedTensor, QuantizedRole, MergeJob);
- `planner`: `make_plan`, which puts the parts below together;
- `discovery`: the base's shards, headers, index and config;
- `quantized`: the base's quantized format, the output mode, each quantized part's role;
- `names`: which stored tensor a name as PEFT saw it means;
- `updates`: adapter keys -> updates of base tensors, or every problem;
- `memory`: the per-shard memory estimate.
What one update is (`Update`) lives in `core/update.py`, shared with the arithmetic.
"""

from ..fingerprint import ALGORITHM_VERSION
from ..formats.base import TensorRef
from ..update import TILED_FORMS, Update, merges_by_tiles, update_keys
from .discovery import INDEX_FILE, SINGLE_FILE
from .model import MANIFEST_FILE, OWN_FILES, REPORT_FILE, MergeJob, MergePlan, PlannedTensor, QuantizedRole, ShardPlan
from .planner import make_plan
from .quantized import OutputDtype

__all__ = [
    "ALGORITHM_VERSION",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "OWN_FILES",
    "REPORT_FILE",
    "SINGLE_FILE",
    "TILED_FORMS",
    "MergeJob",
    "MergePlan",
    "OutputDtype",
    "PlannedTensor",
    "QuantizedRole",
    "ShardPlan",
    "TensorRef",
    "Update",
    "make_plan",
    "merges_by_tiles",
    "update_keys",
]
