//! Prints what userfaultfd can do on this host (`cargo run -p uffd-sys --example probe`).

fn main() {
    print!("{}", uffd_sys::probe());
}
