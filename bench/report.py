"""What every benchmark script does with its result: print it as JSON (and, if asked, write it to a file),
or as a Markdown table."""

import json


def report(result: dict, json_path: str | None) -> dict:
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def markdown_table(rows: list[dict]) -> str:
    """Rows of equal keys (the columns, in order) as a Markdown table, ready for BENCHMARKS.md."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows])
