"""Column names and file names of the canonical event table and the prepared dataset.

Defined once here; every other module imports them.
"""

import polars as pl

SESSION = "session_id"
ITEM = "item_id"
TIME = "timestamp"
ITEM_IDX = "item_idx"
SPLIT = "split"
SUPPORT = "support"

TIME_DTYPE = pl.Datetime("ms", "UTC")

# Files of a prepared dataset directory.
TRAIN = "train"
TEST = "test"
TRAIN_TR = "train_tr"
VALID = "valid"
SPLITS = (TRAIN, TEST, TRAIN_TR, VALID)
ITEMS_FILE = "items.parquet"
STATS_FILE = "stats.json"


def split_file(split: str) -> str:
    return f"{split}.parquet"
