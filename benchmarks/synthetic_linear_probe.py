"""How hard is the synthetic demo set? Generation time and a raw-pixel linear probe's test accuracy.

    python benchmarks/synthetic_linear_probe.py [--identities 40 --size 64 --seed 0 ...]

Prints one JSON line. The probe should sit well below 1.0 (identities are not separable from pixel
positions alone) and well above chance (1 / identities).
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from facecls.data.synthetic import SyntheticSpec, generate_synthetic_faces, linear_probe_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(SyntheticSpec):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)
    args = parser.parse_args()
    spec = SyntheticSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSpec)})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data_dir = generate_synthetic_faces(Path(tmp) / "faces", spec)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        accuracy = linear_probe_accuracy(data_dir)
        probe_s = time.perf_counter() - start
    result = {
        "spec": spec.to_dict(),
        "images": spec.identities * (spec.images_per_identity + spec.test_per_identity),
        "generate_s": round(generate_s, 2),
        "linear_probe_accuracy": round(accuracy, 4),
        "chance": round(1 / spec.identities, 4),
        "probe_s": round(probe_s, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
