# ruff: noqa: E501 - a table of messages; one message per line reads best
"""Every message pvesim emits, in one table, each with the PVE source it copies (SIMULATION).

Sources name the Proxmox repository, file and sub (PVE 9 / qemu-server 9.x unless noted;
wording unchanged in 8.4 where not noted). `msg(key, **fields)` formats one message.
Messages marked "pvesim" are the simulator's own (fault injection, lab backing) and say so.
"""

from __future__ import annotations

MESSAGES: dict[str, tuple[str, str]] = {
    # --- parameter validation: pve-common src/PVE/JSONSchema.pm -------------------------
    "param_failed": ("Parameter verification failed.", "pve-common JSONSchema.pm validate"),
    "not_in_schema": ("property is not defined in schema and the schema does not allow "
                      "additional properties", "pve-common JSONSchema.pm check_object"),
    "missing": ("property is missing and it is not optional", "pve-common JSONSchema.pm check_prop"),
    "type_check": ("type check ('{type}') failed - got '{value}'", "pve-common JSONSchema.pm check_type"),
    "regex": ("value does not match the regex pattern", "pve-common JSONSchema.pm check_prop"),
    "maximum": ("value must have a maximum value of {max}", "pve-common JSONSchema.pm check_prop"),
    "minimum": ("value must have a minimum value of {min}", "pve-common JSONSchema.pm check_prop"),
    "enum": ("value '{value}' does not have a value in the enumeration '{enum}'",
             "pve-common JSONSchema.pm check_prop"),
    "ps_invalid_key": ("invalid key in comma-separated list property: {key}",
                       "pve-common JSONSchema.pm parse_property_string"),
    "ps_duplicate": ("duplicate key in comma-separated list property: {key}",
                     "pve-common JSONSchema.pm parse_property_string"),
    # --- HTTP server / auth: pve-http-server AnyEvent.pm, pve-manager HTTPServer.pm -------
    "not_implemented": ("Method '{method} {path}' not implemented",
                        "pve-http-server AnyEvent.pm handle_api2_request / pve-manager HTTPServer.pm"),
    "auth_failed": ("Authentication failed!", "pve-manager HTTPServer.pm auth_handler (401 after a 3 s delay: pve-http-server AnyEvent.pm)"),
    "no_ticket": ("No ticket", "pve-manager HTTPServer.pm auth_handler"),
    "csrf": ("Permission denied - invalid csrf token", "pve-common Ticket.pm verify_csrf_prevention_token (code 401)"),
    "ticket_failed": ("authentication failure", "pve-access-control API2/AccessControl.pm create_ticket"),
    "perm": ("Permission check failed ({path}, {priv})", "pve-access-control RPCEnvironment.pm check"),
    "perm_token": ("Permission check failed (URI '{uri}' not available with API token, need proper ticket.)",
                   "pve-manager HTTPServer.pm rest_handler (allowtoken => 0)"),
    "root_only_opt": ("Only root may use this option.", "qemu-server API2/Qemu.pm (skiplock etc.)"),
    "user_exists": ("create user failed: user '{user}' already exists",
                    "pve-access-control API2/User.pm create_user"),
    "no_user": ("no such user ('{user}')", "pve-access-control AccessControl.pm check_user_exist"),
    "token_exists": ("Token already exists.", "pve-access-control API2/User.pm generate_token (raise_param_exc tokenid)"),
    "role_missing": ("role '{role}' does not exist", "pve-access-control API2/ACL.pm update_acl"),
    "node_unreachable": ("Connection refused", "pve-http-server AnyEvent.pm proxy_request (595: the node does not answer)"),
    "hostname_lookup": ("hostname lookup '{node}' failed - failed to get address info for: {node}: "
                        "Name or service not known", "pve-common Network.pm get_ip_from_hostname"),
    # --- cluster / ids -------------------------------------------------------------------
    "vm_exists_nextid": ("VM {vmid} already exists", "pve-manager API2/Cluster.pm nextid"),
    "vm_exists_create": ("unable to create VM {vmid} - VM {vmid} already exists on node '{node}'",
                         "qemu-server API2/Qemu.pm create_vm + pve-cluster Cluster.pm check_vmid_unused"),
    "clone_exists": ("unable to create VM {vmid}: config file already exists",
                     "qemu-server API2/Qemu.pm clone_vm"),
    "no_config": ("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist",
                  "qemu-server QemuConfig.pm load_config"),
    "locked": ("VM is locked ({lock})", "pve-guest-common AbstractConfig.pm check_lock"),
    "digest": ("checksum mismatch (file change by other user?)", "pve-common Tools.pm assert_if_modified"),
    "mapping_digest": ("detected modified configuration - file changed by other user? Try again.",
                       "pve-common Tools.pm assert_if_modified"),
    # --- qemu create / config ------------------------------------------------------------
    "hostpci_root": ("only root can set '{opt}' config for non-mapped devices",
                     "qemu-server QemuServer.pm check_mapping_access"),
    "hostpci_both": ("Cannot set both 'host' and 'mapping'.", "qemu-server QemuServer/PCI.pm verify_hostpci"),
    "hostpci_none": ("Either 'host' or 'mapping' must be set.", "qemu-server QemuServer/PCI.pm verify_hostpci"),
    "root_only_key": ("only root can set '{opt}' config", "qemu-server API2/Qemu.pm check_vm_modify_config_perm"),
    "ssh_key_invalid": ("SSH public key validation error", "pve-common Tools.pm validate_ssh_public_keys"),
    "import_syntax": ("'import-from' requires special syntax - use <storage ID>:0,import-from=<source>",
                      "qemu-server API2/Qemu.pm check_drive_param"),
    "import_abs": ("Only root can pass arbitrary filesystem paths.", "pve-storage Storage.pm check_volume_access"),
    "import_type": ("'{volid}' has wrong type '{vtype}' - needs to be 'images' or 'import'",
                    "qemu-server API2/Qemu.pm (import-from volume type)"),
    "no_volume": ("volume '{volid}' does not exist", "pve-storage Storage.pm (volume lookup)"),
    "storage_no_images": ("storage '{storage}' does not support vm images",
                          "qemu-server API2/Qemu.pm create_disks"),
    "no_storage": ("storage '{storage}' does not exist", "pve-storage Storage.pm storage_config"),
    "not_template_linked": ("parameter 'storage' not allowed for linked clones",
                            "qemu-server API2/Qemu.pm clone_vm"),
    "linked_needs_template": ("Linked clone feature is not supported for '{volid}' ({opt})",
                              "qemu-server API2/Qemu.pm clone_vm (volume without 'clone' feature: not a template's base volume)"),
    "resize_shrink": ("shrinking disks is not supported", "qemu-server API2/Qemu.pm resize_vm"),
    "resize_nodisk": ("disk '{disk}' does not exist", "qemu-server API2/Qemu.pm resize_vm"),
    "running_destroy": ("VM {vmid} is running - destroy failed", "qemu-server API2/Qemu.pm destroy_vm"),
    "protection": ("can't remove VM {vmid} - protection mode enabled", "qemu-server API2/Qemu.pm destroy_vm"),
    "update_failed": ("failed to update VM {vmid}: {status}", "qemu-server API2/Qemu.pm update_vm_api (background_delay)"),
    "delete_unknown": ("unknown option '{opt}'", "qemu-server API2/Qemu.pm update_vm_api"),
    "delete_conflict": ("you can't use '-{opt}' and -delete {opt}' at the same time", "qemu-server API2/Qemu.pm update_vm_api (sic: one quote)"),
    "no_options": ("no options specified", "qemu-server API2/Qemu.pm update_vm_api"),
    # --- start-time (inside the qmstart task): qemu-server QemuServer.pm / PCI.pm / Memory.pm
    "already_running": ("VM {vmid} already running", "qemu-server QemuServer.pm vm_start_nolock"),
    "start_template": ("you can't start a vm if it's a template", "qemu-server QemuServer.pm vm_start"),
    "no_pci_device": ("no PCI device found for '{id}'", "qemu-server QemuServer/PCI.pm parse_hostpci_devices"),
    # These two `die` without a newline, so Perl appends " at FILE line N." ({at}).
    "q35": ("q35 machine model is not enabled{at}", "qemu-server QemuServer/PCI.pm print_hostpci_devices"),
    "pci_in_use": ("PCI device '{id}' already in use by VMID '{vmid}'",
                   "qemu-server QemuServer/PCI.pm reserve_pci_usage"),
    "mapping_not_found": ("PCI device mapping not found for '{id}'",
                          "qemu-server QemuServer/PCI.pm parse_hostpci_devices"),
    "mapping_invalid": ("PCI device mapping invalid (hardware probably changed): {detail}",
                        "pve-guest-common Mapping/PCI.pm assert_valid"),
    "no_free_device": ("could not find a free device for '{opt}'",
                       "qemu-server QemuServer/PCI.pm choose_hostpci_devices"),
    "hugepages_numa": ("numa needs to be enabled to use hugepages{at}", "qemu-server QemuServer/Memory.pm config"),
    "hugepages_multiple": ("Memory size {mem} is not a multiple of the requested hugepages size {size}",
                           "qemu-server QemuServer/Memory.pm hugepages_size"),
    "start_failed": ("start failed: {detail}", "qemu-server QemuServer.pm vm_start_nolock"),
    "not_running": ("VM {vmid} not running", "qemu-server QemuServer.pm vm_stop / check_running"),
    "shutdown_timeout": ("VM quit/powerdown failed - got timeout", "qemu-server QemuServer.pm vm_stop"),
    # --- agent: qemu-server QemuServer/Agent.pm agent_available ---------------------------
    "agent_not_configured": ("No QEMU guest agent configured", "qemu-server QemuServer/Agent.pm agent_available"),
    "agent_vm_not_running": ("VM {vmid} is not running", "qemu-server QemuServer/Agent.pm agent_available"),
    "agent_not_running": ("QEMU guest agent is not running", "qemu-server QemuServer/Agent.pm agent_available"),
    # --- mappings: pve-manager API2/Cluster/Mapping/PCI.pm --------------------------------
    "mapping_exists": ("create hardware mapping failed: pci ID '{id}' already defined",
                       "pve-manager API2/Cluster/Mapping/PCI.pm create (lock_pci_config prefix)"),
    "mapping_missing": ("mapping '{id}' not found", "pve-manager API2/Cluster/Mapping/PCI.pm get"),
    # --- tasks: pve-manager API2/Tasks.pm, pve-common UPID.pm -----------------------------
    "no_such_task": ("no such task", "pve-manager API2/Tasks.pm read_task_log / read_task_status"),
    "task_ok": ("TASK OK", "pve-common RESTEnvironment.pm fork_worker"),
    "task_error": ("TASK ERROR: {detail}", "pve-common RESTEnvironment.pm fork_worker"),
    "task_warnings": ("TASK WARNINGS: {n}", "pve-common RESTEnvironment.pm fork_worker"),
    # --- storage: pve-storage API2/Storage/Status.pm --------------------------------------
    "download_ext": ("invalid filename or wrong extension", "pve-storage API2/Storage/Status.pm download_url"),
    "content_not_allowed": ("storage '{storage}' does not support content-type '{content}'",
                            "pve-storage Storage.pm (content check)"),
    # --- pvesim's own (simulation; no PVE counterpart) -----------------------------------
    "sim_fault": ("{detail}", "pvesim fault injection (the text is the test's)"),
    "sim_download_loopback": ("pvesim: download-url only fetches from 127.0.0.1 in the lab",
                              "pvesim (lab network rule: loopback only)"),
    "sim_node_gone": ("pvesim: node '{node}' went away (fault injection)",
                      "pvesim fault injection; PVE answers 595 for an unreachable node"),
}


def msg(key: str, /, **fields: object) -> str:
    """The message `key` with its fields filled in."""
    return MESSAGES[key][0].format(**fields)
