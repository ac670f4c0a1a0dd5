"""What `stylize info` prints: the server's GetInfo response (its model, the options' defaults, its limits,
its load now and its job store) as aligned text, or as JSON."""

from __future__ import annotations

from stylize_service.client.flags import value_text
from stylize_service.client.options import OPTIONS
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb


def print_server_info(info: pb.GetInfoResponse, server: str, *, as_json: bool) -> None:
    if as_json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(info, always_print_fields_with_no_presence=True))
        return
    model, limits, d = info.model, info.limits, info.defaults
    pre = model.preprocessing
    print(f"server           {server} (stylize-service {info.server_version})")
    print(f"model            {model.name}: {model.weights_source}")
    print(f"providers        {', '.join(model.providers)}")
    print(
        f"preprocessing    {pre.channel_order}, (x * {pre.input_scale:g} - mean) / std, "
        f"mean {' '.join(map(_g, pre.mean))}, std {' '.join(map(_g, pre.std))}"
    )
    print(f"layers           {', '.join(model.layers)}")
    masks = "yes (--mask, --style-mask)" if info.features.style_masks else "no (this server ignores --mask)"
    print(f"style masks      {masks}")
    print("defaults         (the flags' values when left out; unset: chosen per request, see --help)")
    for option in OPTIONS.values():
        print(f"  {option.flag:<18} {value_text(option, d)}")
    print("limits")
    print(f"  max pixels     {limits.max_pixels} per input image")
    print(f"  max message    {limits.max_message_bytes / 2**20:g} MiB")
    print(
        f"  max size       {limits.max_size} px, {limits.max_iterations} iterations, {limits.max_styles} styles"
    )
    print(
        f"  jobs           {limits.concurrency} at a time, {limits.queue_size} queued, "
        f"{limits.max_jobs_per_client} per client"
    )
    print(
        f"  memory         {_mib(limits.memory_budget_bytes)} MiB budget, "
        f"{_mib(limits.memory_for_jobs_bytes)} MiB for jobs (larger stages run in exact tiles)"
    )
    print(f"  max weight     {_g(limits.max_weight)}")
    cache, load = info.graph_cache, info.load
    print("now")
    print(f"  jobs           {load.running_jobs} running, {load.queued_jobs} queued")
    print(
        f"  graph cache    {cache.entries} layer choice(s), {_mib(cache.used_bytes)} of "
        f"{_mib(cache.budget_bytes)} MiB, {cache.evictions} evicted"
    )
    if info.HasField("job_store"):
        _print_job_store(info.job_store)
    else:
        print("job store        none reported (a server without jobs)")


def _print_job_store(store: pb.JobStoreInfo) -> None:
    """The job store (SubmitJob's jobs): what it holds now, its bounds, its checkpoints."""
    order = {name: number for number, name in enumerate(pb.JobState.keys())}  # QUEUED, RUNNING, ...
    states = sorted(store.jobs.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))
    by_state = ", ".join(f"{count} {state.lower()}" for state, count in states if count)
    print(f"job store        {store.kind or '(kind not given)'}")
    print(f"  jobs           {by_state or 'none'}")
    print(f"  used           {_mib(store.used_bytes)} of {_mib(store.capacity_bytes)} MiB")
    print(f"  results kept   {store.result_ttl_seconds} s after a job ends (the oldest go first when full)")
    interval = store.checkpoint_interval_seconds
    print(
        f"  checkpoints    {f'every {interval:g} s' if interval else 'never'}; "
        f"{store.checkpoints_written} written in {store.checkpoint_seconds:.1f} s, "
        f"{store.jobs_resumed} job(s) resumed since the server started"
    )
    print(
        f"  frames kept    {store.frames_retained_per_job} per job, at most "
        f"{_mib(store.frame_bytes_retained_per_job)} MiB, for replays"
    )


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f}"


def _g(value: float) -> str:
    return f"{value:g}"
