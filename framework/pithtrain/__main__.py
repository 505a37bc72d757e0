"""`pithtrain <command> ...`: one console script over the module entry points."""

import sys

USAGE = """usage: pithtrain {train,benchmark,convert,data} ...

  train     train a model:             pithtrain train --config framework/configs/tiny-qwen3-moe.toml
  benchmark throughput (tok/s, MFU):  pithtrain benchmark --config framework/configs/small-qwen3-moe.toml
  convert   Hugging Face import/export: pithtrain convert export --run-dir runs/x --out hf/x
  data      tokenizer and token shards: pithtrain data tokenize --tokenizer T --input a.jsonl --out data/x
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "train":
        from pithtrain.train import main as run
    elif command == "benchmark":
        from pithtrain.benchmark import main as run
    elif command == "convert":
        from pithtrain.convert import main as run
    elif command == "data":
        from pithtrain.data import main as run
    else:
        print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
        return 0 if command in ("-h", "--help") else 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
