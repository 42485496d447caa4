"""Method experiments, service performance and tooling, each a module run from the repository root:
`python -m benchmarks.NAME --help`. The index (question, results file, docs section, status) is benchmarks/README.md."""
