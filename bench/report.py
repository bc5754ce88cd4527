"""What every benchmark script does with its result: print it as JSON and, if asked, write it to a file."""

import json


def report(result: dict, json_path: str | None) -> dict:
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result
