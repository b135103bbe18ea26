"""What every benchmark prints and stores about the machine it ran on: CPU model, the vector ISA extensions that
decide CPU kernels, and the threads (read once through `dinokit.layers.linear.cpuinfo`)."""

from __future__ import annotations

import os
import platform

import torch

from dinokit.layers.linear import cpuinfo

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def cpu_description() -> str:
    model = cpuinfo("model name") or platform.processor() or platform.machine()
    flags = f" {cpuinfo('flags')} "
    isa = [f for f in ISA_FLAGS if f" {f} " in flags]
    return (f"{model}; ISA {'+'.join(isa) or '?'}; {os.cpu_count()} logical CPUs, "
            f"torch threads {torch.get_num_threads()}")
