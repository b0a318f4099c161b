"""Decoding: any upload to 16 kHz mono samples. ``stream`` holds the decoded audio as it grows
(on disk, read by slice); ``ffmpeg`` is the ffmpeg command line and the demuxer whitelist;
``pyav_decoder`` and ``pyav_worker`` run FFmpeg's libraries in decoder worker processes. The group
imports nothing of the bridge but ``bridge.ports``; a request's use of it is ``bridge.upload``."""
