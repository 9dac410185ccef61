"""Reading the watched table's rows: the plain and Arrow readers behind one interface.

* :mod:`~anomaly_monitor.reading.values`: what a window holds (:class:`Window`,
  quarantined :class:`BadRow`), value and timestamp conversion.
* :mod:`~anomaly_monitor.reading.query`: the queries, from the reflected columns.
* :mod:`~anomaly_monitor.reading.horizon`: PostgreSQL's transaction horizon.
* :mod:`~anomaly_monitor.reading.plain` and :mod:`~anomaly_monitor.reading.arrow`
  (with its :mod:`~anomaly_monitor.reading.backends`): the two readers' pages.
* :mod:`~anomaly_monitor.reading.windows`: :func:`read_window`, where a window stops.
"""
