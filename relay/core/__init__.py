"""The pure core: values in, values out.

No asyncio, no aiohttp, no file or network I/O: verification state, policy
decisions, rate arithmetic, RFC 9110 decisions, SemVer, units and the wire
protocol's names and rules. Everything above builds on it.
"""
