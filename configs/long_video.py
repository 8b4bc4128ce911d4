"""Long rows of video: the tiny two-stage run on videos of 16 frames x 64 soft tokens, packed into rows
of 4,096 tokens and read through the blockwise attention kernel (no (L, L) array in any layer).

  python -m embed2.main --config=configs/long_video.py --workdir=/tmp/long_video
  python -m embed2.main --config=configs/long_video.py:row=8192,segments=6 --workdir=/tmp/lv8k

A query is a generated clip of a moving shape with its beep track (data_pipelines/media_tasks.py,
`moving_shapes`) and the task string; the target its description. Each clip is sampled at 8 fps over
its 2 s: 16 frames (the nearest of its 4-8 source frames), each a 32x32 image in 4x4 patches, i.e. 64
soft tokens + 2 boundary tokens, plus ~50 audio tokens: ~1,110 tokens a video, three to a 4,096-token
row. The model, optimiser and stage layout are configs/tiny.py's; the media preprocessing and the task
are configs/demo.py's, with the frame budget raised. `impl=xla` runs the same rows through the (L, L)
reference for comparison (at 4,096 tokens that is 256 MiB of logits per head and layer).
"""

from ml_collections import config_dict

from configs import common
from configs import demo
from configs import tiny

# 16 frames of 64 soft tokens each: the demo's media with an 8x8 patch grid per frame and 8 fps.
LONG_VIDEO_MEDIA = dict(demo.MEDIA, patch_size=4, image_tokens=64, video_fps=8.0, video_max_frames=16)


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  k = common.parse_arg(arg, row=4096, segments=3, batch=8, steps=3, layers=2, dim=64, window=256,
                       impl="auto", seed=0)
  c = tiny.get_config(f"layers={k.layers},dim={k.dim},batch={k.batch},pft_steps={k.steps},"
                      f"ft_steps={k.steps},every={k.steps},seed={k.seed}")
  c.model.max_length = k.row
  c.model.sliding_window = k.window  # the tiny preset's 8 would make every sliding layer trivial
  c.model.max_segments = k.segments
  c.model.attention_impl = k.impl  # auto: blockwise on a CPU for rows over 256 tokens
  c.model.media = LONG_VIDEO_MEDIA
  video = dict(demo.media_tasks(k.batch)["v2t"], query_len=k.row, segments=k.segments)
  c.tasks = config_dict.ConfigDict({"v2t": video})
  for stage in c.stages:
    stage.tasks = dict(v2t=1.0)
  c.stages[0].batch = dict(batch_size=k.batch, query_len=k.row, positive_len=video["positive_len"],
                           segments=k.segments)
  c.soup = dict(method="uniform", variants=())
  return c
