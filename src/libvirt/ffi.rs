//! The part of libvirt's C API that volume secrets need, loaded from
//! `libvirt.so.0` at run time on first use instead of linked.
//!
//! Linking libvirt makes every process load it and the ~60 libraries it
//! depends on before `main`, which costs a CLI call ten times its own
//! work on a cold cache and makes the package depend on libvirt on hosts
//! that only ever use dm-crypt. Loaded here, only the libvirt mode pays,
//! and a host without libvirt gets a typed "unavailable" error instead of
//! a binary that does not start.
//!
//! Every function is part of libvirt's stable ABI (the oldest here,
//! `virGetLastErrorCode`, is from libvirt 4.5). Handles are owned: a
//! [`Connection`] closes and a [`SecretHandle`] frees itself on drop.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

use libloading::Library;

/// The soname libvirt has kept since 0.x.
const LIBVIRT_SONAME: &str = "libvirt.so.0";

/// `VIR_SECRET_USAGE_TYPE_VOLUME`.
pub const USAGE_TYPE_VOLUME: c_int = 1;

/// `VIR_ERR_NO_SECRET`: no secret with that UUID or usage.
pub const ERR_NO_SECRET: c_int = 66;

/// `VIR_UUID_STRING_BUFLEN`: 36 characters and the NUL.
const UUID_STRING_BUFLEN: usize = 37;

type ConnectPtr = *mut c_void;
type SecretPtr = *mut c_void;
type DomainPtr = *mut c_void;
type ErrorFunc = unsafe extern "C" fn(*mut c_void, *mut c_void);
/// `virConnectListAllSecrets` and `virConnectListAllDomains`.
type ListAllFn = unsafe extern "C" fn(ConnectPtr, *mut *mut *mut c_void, c_uint) -> c_int;

/// A libvirt call that failed: libvirt's error code and message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} (libvirt error {code})")]
pub struct Failure {
    /// libvirt's `virErrorNumber`, or -1 when libvirt could not be loaded.
    pub code: i32,
    /// libvirt's message (names objects, never secret values).
    pub message: String,
}

/// Entry points resolved from the loaded library. The `Library` is kept
/// so the function pointers stay valid; it lives in a static, so forever.
struct Api {
    _lib: Library,
    connect_open: unsafe extern "C" fn(*const c_char) -> ConnectPtr,
    connect_close: unsafe extern "C" fn(ConnectPtr) -> c_int,
    list_all_secrets: ListAllFn,
    lookup_by_usage: unsafe extern "C" fn(ConnectPtr, c_int, *const c_char) -> SecretPtr,
    lookup_by_uuid_string: unsafe extern "C" fn(ConnectPtr, *const c_char) -> SecretPtr,
    define_xml: unsafe extern "C" fn(ConnectPtr, *const c_char, c_uint) -> SecretPtr,
    get_uuid_string: unsafe extern "C" fn(SecretPtr, *mut c_char) -> c_int,
    get_xml_desc: unsafe extern "C" fn(SecretPtr, c_uint) -> *mut c_char,
    get_usage_type: unsafe extern "C" fn(SecretPtr) -> c_int,
    set_value: unsafe extern "C" fn(SecretPtr, *const u8, usize, c_uint) -> c_int,
    undefine: unsafe extern "C" fn(SecretPtr) -> c_int,
    secret_free: unsafe extern "C" fn(SecretPtr) -> c_int,
    list_all_domains: ListAllFn,
    domain_get_xml_desc: unsafe extern "C" fn(DomainPtr, c_uint) -> *mut c_char,
    domain_free: unsafe extern "C" fn(DomainPtr) -> c_int,
    last_error_code: unsafe extern "C" fn() -> c_int,
    last_error_message: unsafe extern "C" fn() -> *const c_char,
    reset_last_error: unsafe extern "C" fn(),
}

/// libvirt's default error handler prints every error to stderr; we
/// report errors ourselves, typed and with their context.
unsafe extern "C" fn ignore_error(_user: *mut c_void, _error: *mut c_void) {}

impl Api {
    /// Loads `soname` and resolves every entry point, then initialises
    /// libvirt for use from many threads and silences its stderr handler.
    fn load(soname: &str) -> Result<Api, Failure> {
        let unloadable = |e: libloading::Error| Failure {
            code: -1,
            message: format!("cannot load {soname} (is libvirt installed?): {e}"),
        };
        // SAFETY: loading libvirt runs its ELF constructors, which only
        // set up libvirt's own global state; nothing else in the process
        // depends on the order of that.
        let lib = unsafe { Library::new(soname) }.map_err(unloadable)?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the type each field declares is the prototype
                // of that function in libvirt's public headers
                // (libvirt-host.h, libvirt-secret.h, virterror.h).
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(unloadable)?
            };
        }
        let initialize: unsafe extern "C" fn() -> c_int = sym!("virInitialize");
        let set_error_func: unsafe extern "C" fn(*mut c_void, Option<ErrorFunc>) =
            sym!("virSetErrorFunc");
        let api = Api {
            connect_open: sym!("virConnectOpen"),
            connect_close: sym!("virConnectClose"),
            list_all_secrets: sym!("virConnectListAllSecrets"),
            lookup_by_usage: sym!("virSecretLookupByUsage"),
            lookup_by_uuid_string: sym!("virSecretLookupByUUIDString"),
            define_xml: sym!("virSecretDefineXML"),
            get_uuid_string: sym!("virSecretGetUUIDString"),
            get_xml_desc: sym!("virSecretGetXMLDesc"),
            get_usage_type: sym!("virSecretGetUsageType"),
            set_value: sym!("virSecretSetValue"),
            undefine: sym!("virSecretUndefine"),
            secret_free: sym!("virSecretFree"),
            list_all_domains: sym!("virConnectListAllDomains"),
            domain_get_xml_desc: sym!("virDomainGetXMLDesc"),
            domain_free: sym!("virDomainFree"),
            last_error_code: sym!("virGetLastErrorCode"),
            last_error_message: sym!("virGetLastErrorMessage"),
            reset_last_error: sym!("virResetLastError"),
            _lib: lib,
        };
        // SAFETY: both take no pointers of ours but the handler, a
        // function that lives for the whole process; libvirt documents
        // virInitialize as the first call of a threaded program.
        unsafe {
            if initialize() < 0 {
                return Err(api.last_failure());
            }
            set_error_func(std::ptr::null_mut(), Some(ignore_error));
        }
        Ok(api)
    }

    /// The calling thread's last libvirt error, which is then cleared so
    /// it cannot be reported twice.
    fn last_failure(&self) -> Failure {
        // SAFETY: both read libvirt's thread-local last error; the
        // message is copied before the reset frees it.
        unsafe {
            let code = (self.last_error_code)();
            let msg = (self.last_error_message)();
            let message = if msg.is_null() {
                "unknown libvirt error".to_string()
            } else {
                CStr::from_ptr(msg).to_string_lossy().into_owned()
            };
            (self.reset_last_error)();
            Failure { code, message }
        }
    }
}

static API: OnceLock<Result<Api, Failure>> = OnceLock::new();

fn api() -> Result<&'static Api, Failure> {
    API.get_or_init(|| Api::load(LIBVIRT_SONAME))
        .as_ref()
        .map_err(Clone::clone)
}

/// A string for C, or a failure naming what held a NUL byte.
fn c_string(what: &str, s: &str) -> Result<CString, Failure> {
    CString::new(s).map_err(|_| Failure {
        code: -1,
        message: format!("{what} contains a NUL byte"),
    })
}

/// Takes ownership of a string libvirt allocated for the caller.
///
/// # Safety
/// `p` is null or a NUL-terminated string from `malloc` that nothing
/// else frees.
unsafe fn take_c_string(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: per this function's contract.
    unsafe {
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        libc::free(p.cast());
        Some(s)
    }
}

/// An open connection to libvirt.
pub struct Connection {
    api: &'static Api,
    ptr: ConnectPtr,
}

// SAFETY: libvirt connections are thread-safe: one virConnectPtr may be
// used from several threads at once (libvirt's threading guarantees
// since 0.6); the error state it reports through is thread-local.
unsafe impl Send for Connection {}
// SAFETY: as for Send; no method takes `&mut self`.
unsafe impl Sync for Connection {}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from virConnectOpen and is closed only here.
        // A failure to close a connection we are done with changes
        // nothing for the caller.
        unsafe {
            (self.api.connect_close)(self.ptr);
        }
    }
}

/// A reference to one secret, freed on drop.
pub struct SecretHandle {
    api: &'static Api,
    ptr: SecretPtr,
}

impl Drop for SecretHandle {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a secret reference we own, freed only here.
        unsafe {
            (self.api.secret_free)(self.ptr);
        }
    }
}

/// A reference to one domain, freed on drop.
pub struct DomainHandle {
    api: &'static Api,
    ptr: DomainPtr,
}

impl Drop for DomainHandle {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a domain reference we own, freed only here.
        unsafe {
            (self.api.domain_free)(self.ptr);
        }
    }
}

impl DomainHandle {
    /// The domain's XML definition (its live one when it runs).
    pub fn xml(&self) -> Result<String, Failure> {
        // SAFETY: a live domain reference; the result is ours to free.
        unsafe { take_c_string((self.api.domain_get_xml_desc)(self.ptr, 0)) }
            .ok_or_else(|| self.api.last_failure())
    }
}

impl Connection {
    /// Every domain libvirt knows, running or only defined.
    pub fn list_all_domains(&self) -> Result<Vec<DomainHandle>, Failure> {
        self.list_all(self.api.list_all_domains, |api, ptr| DomainHandle {
            api,
            ptr,
        })
    }

    /// Calls one of libvirt's `virConnectListAll*` functions, which store
    /// a malloc'd array of `n` owned references; each becomes a handle
    /// (which frees it) and the array is freed here.
    fn list_all<T>(
        &self,
        list: ListAllFn,
        wrap: impl Fn(&'static Api, *mut c_void) -> T,
    ) -> Result<Vec<T>, Failure> {
        let mut array: *mut *mut c_void = std::ptr::null_mut();
        // SAFETY: a live connection; on success `array` holds `n` valid
        // references that nothing else owns, handed to `wrap` once each.
        unsafe {
            let n = list(self.ptr, &mut array, 0);
            if n < 0 {
                return Err(self.api.last_failure());
            }
            let handles = (0..n as usize)
                .map(|i| wrap(self.api, *array.add(i)))
                .collect();
            libc::free(array.cast());
            Ok(handles)
        }
    }

    /// Connects to `uri`, loading libvirt first if needed.
    pub fn open(uri: &str) -> Result<Connection, Failure> {
        let api = api()?;
        let c_uri = c_string("the libvirt URI", uri)?;
        // SAFETY: `c_uri` is a valid C string for the call's duration.
        let ptr = unsafe { (api.connect_open)(c_uri.as_ptr()) };
        if ptr.is_null() {
            return Err(api.last_failure());
        }
        Ok(Connection { api, ptr })
    }

    fn secret(&self, ptr: SecretPtr) -> Result<SecretHandle, Failure> {
        if ptr.is_null() {
            Err(self.api.last_failure())
        } else {
            Ok(SecretHandle { api: self.api, ptr })
        }
    }

    /// The secret with usage `usage_type` and usage id `usage_id`.
    pub fn lookup_by_usage(
        &self,
        usage_type: c_int,
        usage_id: &str,
    ) -> Result<SecretHandle, Failure> {
        let id = c_string("the usage id", usage_id)?;
        // SAFETY: a live connection and a valid C string.
        let ptr = unsafe { (self.api.lookup_by_usage)(self.ptr, usage_type, id.as_ptr()) };
        self.secret(ptr)
    }

    /// The secret with UUID `uuid`.
    pub fn lookup_by_uuid(&self, uuid: &str) -> Result<SecretHandle, Failure> {
        let id = c_string("the secret UUID", uuid)?;
        // SAFETY: a live connection and a valid C string.
        let ptr = unsafe { (self.api.lookup_by_uuid_string)(self.ptr, id.as_ptr()) };
        self.secret(ptr)
    }

    /// Defines (or redefines, when the XML names an existing UUID) a
    /// secret.
    pub fn define_secret(&self, xml: &str) -> Result<SecretHandle, Failure> {
        let xml = c_string("the secret XML", xml)?;
        // SAFETY: a live connection and a valid C string.
        let ptr = unsafe { (self.api.define_xml)(self.ptr, xml.as_ptr(), 0) };
        self.secret(ptr)
    }

    /// Every secret libvirt holds.
    pub fn list_all_secrets(&self) -> Result<Vec<SecretHandle>, Failure> {
        self.list_all(self.api.list_all_secrets, |api, ptr| SecretHandle {
            api,
            ptr,
        })
    }
}

impl SecretHandle {
    fn check(&self, rc: c_int) -> Result<c_int, Failure> {
        if rc < 0 {
            Err(self.api.last_failure())
        } else {
            Ok(rc)
        }
    }

    /// The secret's UUID.
    pub fn uuid(&self) -> Result<String, Failure> {
        let mut buf = [0 as c_char; UUID_STRING_BUFLEN];
        // SAFETY: libvirt writes at most VIR_UUID_STRING_BUFLEN bytes,
        // NUL included, into `buf`.
        let rc = unsafe { (self.api.get_uuid_string)(self.ptr, buf.as_mut_ptr()) };
        self.check(rc)?;
        // SAFETY: on success `buf` holds a NUL-terminated string.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    /// The secret's XML definition (never its value).
    pub fn xml(&self) -> Result<String, Failure> {
        // SAFETY: a live secret; the result is ours to free.
        unsafe { take_c_string((self.api.get_xml_desc)(self.ptr, 0)) }
            .ok_or_else(|| self.api.last_failure())
    }

    /// The secret's usage type.
    pub fn usage_type(&self) -> Result<c_int, Failure> {
        // SAFETY: a live secret.
        let rc = unsafe { (self.api.get_usage_type)(self.ptr) };
        self.check(rc)
    }

    /// Sets the secret's value. libvirt copies `value` into its RPC
    /// buffer; no copy is made here.
    pub fn set_value(&self, value: &[u8]) -> Result<(), Failure> {
        // SAFETY: a live secret; `value` is valid for `len` bytes for the
        // call's duration.
        let rc = unsafe { (self.api.set_value)(self.ptr, value.as_ptr(), value.len(), 0) };
        self.check(rc).map(drop)
    }

    /// Undefines the secret.
    pub fn undefine(&self) -> Result<(), Failure> {
        // SAFETY: a live secret.
        let rc = unsafe { (self.api.undefine)(self.ptr) };
        self.check(rc).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_failure_naming_it() {
        match Api::load("libvirt-does-not-exist.so.0") {
            Err(f) => {
                assert_eq!(f.code, -1);
                assert!(f.message.contains("libvirt-does-not-exist.so.0"), "{f}");
            }
            Ok(_) => panic!("loaded a library that does not exist"),
        }
    }

    #[test]
    fn nul_bytes_never_reach_libvirt() {
        let f = c_string("the usage id", "vol\0ume").unwrap_err();
        assert!(f.message.contains("usage id"), "{f}");
    }
}
