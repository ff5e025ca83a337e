"""pdbox's own CPU kernels in C, for what torch's CPU ops do slowly (``build`` compiles and loads them).

Each has a Python wrapper that checks its arguments and a torch reference it is tested against; an
engine falls back to torch when :func:`kernels.cpu.build.load` says this machine cannot run one.
"""
