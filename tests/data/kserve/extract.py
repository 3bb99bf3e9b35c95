"""Regenerate inferenceservice-v1beta1.schema.json from KServe's CRD (see README.md).

    git clone --depth 1 --branch v0.20.0 https://github.com/kserve/kserve /tmp/kserve
    python tests/data/kserve/extract.py /tmp/kserve/config/crd/full/serving.kserve.io_inferenceservices.yaml \
        --tag v0.20.0 --commit "$(git -C /tmp/kserve rev-parse HEAD)"

The schema is copied as it is (key order kept, nothing pruned); only the JSON is compact.
"""
import argparse
import hashlib
import json
from pathlib import Path

import yaml

PATH = "config/crd/full/serving.kserve.io_inferenceservices.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("crd", type=Path)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--version", default="v1beta1")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("inferenceservice-v1beta1.schema.json"))
    args = parser.parse_args()
    raw = args.crd.read_bytes()
    crd = yaml.safe_load(raw)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == args.version)
    assert version["served"], f"{args.version} is not served by this CRD"
    doc = {
        "source": {
            "repository": "https://github.com/kserve/kserve",
            "tag": args.tag,
            "commit": args.commit,
            "path": PATH,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "license": "Apache-2.0, Copyright The KServe Authors (see LICENSE next to this file)",
        },
        "apiVersion": f"{crd['spec']['group']}/{args.version}",
        "kind": crd["spec"]["names"]["kind"],
        "openAPIV3Schema": version["schema"]["openAPIV3Schema"],
    }
    args.out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"{args.out}: {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
