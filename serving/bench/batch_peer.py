"""The plain pandas + scikit-learn batch scorer the batch command is compared with (``make bench-batch``).

    python serving/bench/batch_peer.py MODEL.pkl FEATURES.json INPUT OUTPUT

What a data scientist writes without this project: read the table with pandas, ``predict_proba``
with the fitted sklearn pipeline, write id, prediction and one probability column per class with
pandas. It imports nothing of the project, so it runs as its own process exactly like such a script.
"""

import json
import pickle
import sys

import pandas as pd


def main(model_file: str, features_file: str, inp: str, out: str) -> None:
    with open(model_file, "rb") as f:
        pipe, class_names = pickle.load(f)
    with open(features_file) as f:
        features = json.load(f)
    df = pd.read_parquet(inp) if inp.endswith(".parquet") else pd.read_csv(inp)
    proba = pipe.predict_proba(df[features].to_numpy())
    result = pd.DataFrame({"id": df["id"], "prediction": pipe.classes_[proba.argmax(axis=1)]})
    for j, name in enumerate(class_names):
        result[f"prob_{name}"] = proba[:, j].astype("float32")
    if out.endswith(".parquet"):
        result.to_parquet(out, index=False)
    else:
        result.to_csv(out, index=False)


if __name__ == "__main__":
    main(*sys.argv[1:5])
