"""Development harnesses for benchmarks and tests: PulseAudio null sinks, processes on free ports."""
