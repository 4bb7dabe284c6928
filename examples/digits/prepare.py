"""Stage `prepare`: scikit-learn's bundled digits -> data/train.npz, data/test.npz (no download)."""

from __future__ import annotations

import numpy as np
from common import DATA_DIR, load_params
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main() -> None:
    params = load_params("prepare")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=params["test_size"], random_state=params["seed"], stratify=y
    )
    DATA_DIR.mkdir(exist_ok=True)
    np.savez(DATA_DIR / "train.npz", x=x_train, y=y_train)
    np.savez(DATA_DIR / "test.npz", x=x_test, y=y_test)
    print(f"prepared {len(y_train)} train / {len(y_test)} test samples in {DATA_DIR}/")


if __name__ == "__main__":
    main()
