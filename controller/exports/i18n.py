"""Column headers, labels and enumerated values of the exports, in English and Russian.

Identifiers (machine ids, serials, MACs, URLs) are never translated; headers, summary labels
and the words for states, statuses and yes/no are. A key missing from a language falls back
to English, and a test checks that none is missing.
"""

from __future__ import annotations

from typing import Final, Literal

Lang = Literal["en", "ru"]
LANGS: Final[tuple[Lang, ...]] = ("en", "ru")

_LABELS: Final[dict[str, tuple[str, str]]] = {
    # register columns
    "machine_id": ("Machine ID", "ID машины"),
    "vendor": ("Vendor", "Производитель"),
    "model": ("Model", "Модель"),
    "label_serial": ("Label serial", "Серийный номер (табличка)"),
    "reported_serial": ("Reported serial", "Серийный номер (по данным машины)"),
    "serial_mismatch": ("Serial mismatch", "Расхождение серийных номеров"),
    "control_board_serial": ("Control board serial", "Серийный номер платы управления"),
    "hashboard_serials": ("Hashboard serials", "Серийные номера хэш-плат"),
    "psu_serial": ("PSU serial", "Серийный номер БП"),
    "mac": ("MAC address", "MAC-адрес"),
    "firmware": ("Firmware", "Прошивка"),
    "firmware_version": ("Firmware version", "Версия прошивки"),
    "owner": ("Owner", "Владелец"),
    "licence_number": ("Licence number", "Номер лицензии"),
    "site": ("Site", "Площадка"),
    "container": ("Container", "Контейнер"),
    "rack": ("Rack", "Стойка"),
    "shelf": ("Shelf", "Полка"),
    "slot": ("Slot", "Место"),
    "ip": ("IP address", "IP-адрес"),
    "nominal_ths": ("Nominal hashrate, TH/s", "Номинальный хешрейт, TH/s"),
    "nominal_w": ("Nominal power, W", "Номинальная мощность, Вт"),
    "avg_hashrate_ths": ("Average hashrate, TH/s", "Средний хешрейт, TH/s"),
    "avg_power_w": ("Average power, W", "Средняя мощность, Вт"),
    "operating_hours": ("Operating hours", "Часы работы"),
    "approved_pool_set": ("Approved pool set", "Утверждённый набор пулов"),
    "configured_pools": ("Configured pools (read back)", "Настроенные пулы (считано)"),
    "worker_name": ("Worker name", "Имя воркера"),
    "pool_compliance": ("Pool compliance", "Соответствие пулу"),
    "last_pool_check": ("Last pool check (UTC)", "Последняя проверка пулов (UTC)"),
    "lifecycle_state": ("Lifecycle state", "Состояние"),
    "state_since": ("State since (UTC)", "В состоянии с (UTC)"),
    "commissioned_at": ("Commissioned (UTC)", "Ввод в эксплуатацию (UTC)"),
    "decommissioned_at": ("Decommissioned (UTC)", "Вывод из эксплуатации (UTC)"),
    "record_version": ("Record version", "Версия записи"),
    # compliance columns
    "compliant_pct": ("Time in compliance, %", "Время в соответствии, %"),
    "compliant_h": ("Compliant, h", "В соответствии, ч"),
    "non_compliant_h": ("Non-compliant, h", "Не в соответствии, ч"),
    "unknown_h": ("Unknown, h", "Неизвестно, ч"),
    "exempt_h": ("Exempt, h", "Исключение, ч"),
    "observed_h": ("Hours in period", "Часов в периоде"),
    "incidents": ("Drift incidents", "Инциденты смены пула"),
    "unremediated": ("Unremediated incidents", "Неустранённые инциденты"),
    "repeat_offender": ("Repeat offender", "Повторный нарушитель"),
    "machines": ("Machines", "Машин"),
    "repeat_offenders": ("Repeat offenders", "Повторные нарушители"),
    "detected_at": ("Detected (UTC)", "Обнаружено (UTC)"),
    "action": ("Action", "Действие"),
    "action_at": ("Action at (UTC)", "Время действия (UTC)"),
    "remediated_at": ("Remediated (UTC)", "Устранено (UTC)"),
    "outcome": ("Outcome", "Результат"),
    "cause": ("Cause", "Причина"),
    "problems": ("Problems found", "Выявленные нарушения"),
    "after_reboot": ("After reboot", "После перезагрузки"),
    # audit columns
    "seq": ("Seq", "№"),
    "at": ("At (UTC)", "Время (UTC)"),
    "actor": ("Actor", "Кто"),
    "actor_kind": ("Actor kind", "Тип"),
    "entity": ("Entity", "Объект"),
    "entity_id": ("Entity ID", "ID объекта"),
    "before": ("Before", "До"),
    "after": ("After", "После"),
    "source": ("Source", "Источник"),
    "reason": ("Reason", "Основание"),
    "prev_hash": ("Previous hash", "Предыдущий хеш"),
    "hash": ("Hash", "Хеш"),
    # documents, sheets and the cover
    "title.register": ("Machine register", "Реестр оборудования"),
    "title.compliance": ("Pool compliance report", "Отчёт о соответствии пулам"),
    "title.audit": ("Audit log", "Журнал аудита"),
    "sheet.summary": ("Summary", "Сводка"),
    "sheet.register": ("Register", "Реестр"),
    "sheet.machines": ("Machines", "Машины"),
    "sheet.incidents": ("Incidents", "Инциденты"),
    "sheet.sites": ("Sites", "Площадки"),
    "sheet.audit": ("Audit log", "Журнал аудита"),
    "cover.site": ("Site", "Площадка"),
    "cover.all_sites": ("all sites", "все площадки"),
    "cover.as_of": ("As of (UTC)", "По состоянию на (UTC)"),
    "cover.period": ("Period (UTC)", "Период (UTC)"),
    "cover.counted_until": ("Counted up to (UTC)", "Учтено по (UTC)"),
    "cover.generated_at": ("Generated at (UTC)", "Сформировано (UTC)"),
    "cover.generated_by": ("Generated by", "Кем сформировано"),
    "cover.filters": ("Filters", "Фильтры"),
    "cover.rows": ("Rows", "Строк"),
    "cover.chain_head": ("Audit chain head", "Вершина цепочки аудита"),
    "cover.key": ("Signing key (SHA-256)", "Ключ подписи (SHA-256)"),
    "cover.totals": ("Totals", "Итоги"),
    "cover.verify": (
        "Verify this export offline: asicfleet verify-export <folder> --public-key <file>",
        "Проверка выгрузки без сети: asicfleet verify-export <папка> --public-key <файл>",
    ),
    "total.fleet": ("Fleet total", "Всего по парку"),
    "total.machines": ("Machines", "Машин"),
    "total.by_state": ("By lifecycle state", "По состояниям"),
    "total.nominal_ths": ("Nominal hashrate, TH/s", "Номинальный хешрейт, TH/s"),
    "total.nominal_w": ("Nominal power, W", "Номинальная мощность, Вт"),
    "total.non_compliant": ("Machines not compliant", "Машин не в соответствии"),
    "total.compliant_pct": ("Fleet time in compliance, %", "Время в соответствии по парку, %"),
    "total.incidents": ("Drift incidents", "Инциденты смены пула"),
    "total.unremediated": ("Unremediated incidents", "Неустранённые инциденты"),
    "total.repeat_offenders": ("Repeat offenders", "Повторные нарушители"),
    "total.entries": ("Entries", "Записей"),
    "page": ("Page {page} of {pages}", "Страница {page} из {pages}"),
    "continued": ("{title}, continued", "{title} (продолжение)"),
    "part": ("{title}: {part}", "{title}: {part}"),
    "part.identity": ("identity", "идентификация"),
    "part.location": ("ownership and location", "владелец и размещение"),
    "part.operation": ("operation and pools", "работа и пулы"),
    "part.lifecycle": ("lifecycle", "жизненный цикл"),
    # values
    "yes": ("yes", "да"),
    "no": ("no", "нет"),
    "state.discovered": ("discovered", "обнаружена"),
    "state.registered": ("registered", "зарегистрирована"),
    "state.active": ("active", "в работе"),
    "state.maintenance": ("maintenance", "обслуживание"),
    "state.rma": ("RMA", "гарантийный ремонт"),
    "state.decommissioned": ("decommissioned", "выведена из эксплуатации"),
    "status.compliant": ("compliant", "соответствует"),
    "status.non_compliant": ("non-compliant", "не соответствует"),
    "status.unknown": ("unknown", "неизвестно"),
    "status.exempt": ("exempt", "исключение"),
    "outcome.open": ("open", "открыт"),
    "outcome.verified": ("remediated", "устранён"),
    "outcome.failed": ("failed", "не устранён"),
}


def label(key: str, lang: Lang) -> str:
    """The text for ``key`` in ``lang`` (English when the key has no translation)."""
    pair = _LABELS.get(key)
    if pair is None:
        return key
    return pair[LANGS.index(lang)] or pair[0]


def value_label(prefix: str, value: str, lang: Lang) -> str:
    """An enumerated value (``state.active``, ``status.unknown``) in ``lang``; unknown values
    are shown as they are rather than dropped."""
    key = f"{prefix}.{value}"
    return label(key, lang) if key in _LABELS else value


def keys() -> list[str]:
    return list(_LABELS)


def missing(lang: Lang) -> list[str]:
    """Keys without a text in ``lang`` (a test keeps this empty)."""
    index = LANGS.index(lang)
    return [k for k, pair in _LABELS.items() if not pair[index]]
