"""What a flow run left on the Prefect API this process is configured for: its task runs."""

from __future__ import annotations


def task_runs(flow_run_id, name_prefix: str = "") -> list:
    """Task runs of `flow_run_id` and of its subflow runs whose name starts with `name_prefix`, by name."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        ids = [flow_run_id]
        frontier = [flow_run_id]
        while frontier:  # subflows (write-shard-groups inside ingest-shards inside ingest-dataset)
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [c.id for c in children]
            ids += frontier
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return sorted((r for r in runs if r.name.startswith(name_prefix)), key=lambda r: r.name)


def latest_task_run_names(flow_name: str) -> list[str]:
    """Names of the task runs of the latest run of the flow `flow_name`, sorted."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                      sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return sorted(t.name for t in tasks)
