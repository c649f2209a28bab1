"""Benchmark building blocks: machine facts, random-weight models, the llama.cpp anchor.

Benchmarks are not tests: the scripts in ``benchmarks/`` and ``mobilemoe bench`` print JSON and
the results go into BENCHMARKS.md with date, machine and command.
"""
