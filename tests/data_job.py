"""A `ray job submit` entrypoint for tests/test_paths.py: `memr2 train`'s own data loading
(learner.train.load_data) under a job, without starting a learner or a fleet. Prints one JSON
object: the job's working dir and each split's sample ids.

    python -m tests.data_job --config deploy/paper.yaml data.locomo_path=/abs/locomo10.json
"""

import json
import os
import sys

from common.config import load_config
from learner.train import load_data

if __name__ == "__main__":
    config, overrides = sys.argv[2], sys.argv[3:]  # argv[1] is --config
    splits = load_data(load_config(config, overrides))
    print(json.dumps({"cwd": os.getcwd(), **{k: [c.sample_id for c in v] for k, v in splits.items()}}))
