"""System metrics of a trial: MLflow's own monitors, sampled on rank 0 and averaged per report."""


def test_system_metrics_are_mlflow_s_own_averaged_per_report():
    from trainers.ray_train import SystemMetrics

    system = SystemMetrics().start()
    sum(i * i for i in range(2_000_000))  # some CPU between two reports
    figures = system.since_last()
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(figures)
    assert figures["system/cpu_utilization_percentage"] > 0 and figures["system/system_memory_usage_megabytes"] > 100
    assert system.since_last().keys() == figures.keys()  # a second interval: the samples were cleared, not lost
