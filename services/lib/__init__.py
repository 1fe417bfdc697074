"""The library the services share: audio (PCM, WAV, resampling, devices), recordings, verb helpers."""
