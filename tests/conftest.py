"""Suite-wide settings: offline, one intra-op thread (tiny models run faster without
intra-op parallelism, and distributed tests start several processes on 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("MMTUNE_TEST_THREADS", "1")))
