"""Everything inside `RankingModel`. Importing the package registers the custom ops that exported
serving programs call (pipeline/export.py, pipeline/predictor.py), so a process that loads a program needs
only `import models`."""

import models.moe_sparse  # noqa: F401  registers rankmixer::sparse_moe_ffn
